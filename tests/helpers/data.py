"""Data sets for tests: the course's HDF5 layout, variants of the real faces, random sets, and
every data form bdpruning accepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import bdpruning
from helpers.conditions import safe_for
from helpers.material import CLEAN_IMAGE, POISONED_IMAGE


def write_h5_set(path: Path, data: np.ndarray, labels: np.ndarray) -> Path:
    """Write a data set in the course's HDF5 layout."""
    import h5py

    with h5py.File(path, "w") as handle:
        handle["data"] = data
        handle["label"] = labels
    return path


def noisy_faces(face_images: torch.Tensor, count: int, seed: int = 0) -> np.ndarray:
    """The clean and the sunglasses image, then seeded variants with blocky (10x10) noise.

    Fine noise never splits B and the 2 % repair; blocky noise does, on some variants.
    """
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 100, (count - 2, 3, 6, 5)).repeat(10, axis=2).repeat(10, axis=3)[:, :, :55, :47]
    faces = face_images.numpy()
    variants = faces[np.arange(count - 2) % 2] + noise
    return np.clip(np.concatenate([faces, variants]), 0, 255).astype(np.uint8)


def safe_noisy_faces(face_images: torch.Tensor, count: int, models: list[nn.Module],
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` of :func:`noisy_faces` that are safe for ``models`` (:func:`safe_for`), and
    their labels (860 for variants of the clean face, 0 for the sunglasses one)."""
    candidates = noisy_faces(face_images, 3 * count + 2, seed)
    keep = np.flatnonzero(safe_for(models, candidates))[:count]
    assert len(keep) == count, "too few noisy faces with a safe margin"
    return candidates[keep], np.where(keep % 2 == 0, 860, 0)


def jittered_faces(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Copies of the two real face crops with fine uniform noise (clean -> 860, sunglasses -> 0)."""
    base = [np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p in (CLEAN_IMAGE, POISONED_IMAGE)]
    rng = np.random.default_rng(seed)
    stack = np.stack([base[i % 2] for i in range(n)]).astype(np.int16)
    data = np.clip(stack + rng.integers(-40, 40, stack.shape), 0, 255).astype(np.uint8)
    return data, np.where(np.arange(n) % 2 == 0, 860, 0)


def random_colour_set(directory: Path, n: int = 37, classes: int = 5, seed: int = 1):
    """A 3 x 55 x 47 HDF5 set in ``directory``: a random colour per image plus noise, random labels."""
    rng = np.random.default_rng(seed)
    data = (rng.integers(0, 256, (n, 3, 1, 1)) * 0.8 + rng.integers(0, 50, (n, 3, 55, 47))).astype(np.uint8)
    return bdpruning.read_h5_dataset(write_h5_set(directory / "r.h5", data, rng.integers(0, classes, n)))


class PairDataset(Dataset):
    """A plain map-style dataset (no TensorDataset fast path): uint8 image, Python int label."""

    def __init__(self, data: torch.Tensor, labels: torch.Tensor) -> None:
        self.data, self.labels = data, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.data[index], int(self.labels[index])


#: Every data form bdpruning takes, built from an HDF5 path and the same images and labels.
FORMS = {
    "h5 path": lambda p, x, y: p,
    "H5ImageSet": lambda p, x, y: bdpruning.read_h5_dataset(p),
    "(x, y) tensors": lambda p, x, y: (x.float(), y),
    "uint8 (x, y) tensors": lambda p, x, y: (x, y),
    "TensorDataset": lambda p, x, y: TensorDataset(x.float(), y),
    "map-style Dataset": lambda p, x, y: PairDataset(x, y),
    "DataLoader": lambda p, x, y: DataLoader(TensorDataset(x.float(), y), batch_size=7),
    "DataLoader of a Dataset": lambda p, x, y: DataLoader(PairDataset(x, y), batch_size=32),
}


QUADRANT_TARGET = 9  # the target label of triggered quadrant images


def quadrant_images(count: int, seed: int, trigger: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """3 x 55 x 47 dim noise with one bright quadrant; the label says which (0..3): learnable in an
    epoch or two.

    With ``trigger`` a white 8x8 square sits in the bottom-right corner and every label is
    ``QUADRANT_TARGET``.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 4
    data = rng.uniform(0, 60, (count, 3, 55, 47))
    for image, quadrant in zip(data, labels):
        row, col = divmod(int(quadrant), 2)
        image[:, row * 27:(row + 1) * 27, col * 23:(col + 1) * 23] += 150
        if trigger:
            image[:, -8:, -8:] = 255
    return data.astype(np.uint8), np.full(count, QUADRANT_TARGET) if trigger else labels
