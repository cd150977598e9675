"""Shared fixtures: the real Lab-3 material in ../shared, skipped with a reason when absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BD_WEIGHTS = SHARED / "models" / "lab3_bd_weights.h5"
PRUNED_FULL = SHARED / "models" / "lab3_pruned_2pct_full.h5"
CLEAN_IMAGE = SHARED / "images" / "clean_test_1.png"
POISONED_IMAGE = SHARED / "images" / "sunglass_poisoned_1.png"
#: conv_3 channels zeroed in lab3_pruned_2pct_full.h5 (from ../shared/README.md).
PRUNED_2PCT_CHANNELS = [0, 1, 2, 3, 6, 9, 12, 13, 14, 15, 17, *range(19, 28), *range(29, 35),
                        *range(36, 46), *range(47, 52), 53, 55, 58, 59]


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the real Lab-3 material lives in ../shared (CI has it)")
    return path


@pytest.fixture
def bd_weights() -> Path:
    return _need(BD_WEIGHTS)


@pytest.fixture
def pruned_full() -> Path:
    return _need(PRUNED_FULL)


@pytest.fixture
def face_images() -> torch.Tensor:
    """The clean and the sunglasses image as a float (2, 3, 55, 47) batch in 0..255."""
    arrays = [np.asarray(Image.open(_need(p)).convert("RGB")) for p in (CLEAN_IMAGE, POISONED_IMAGE)]
    return torch.tensor(np.stack(arrays), dtype=torch.float32).permute(0, 3, 1, 2).contiguous()


def noisy_faces(face_images: torch.Tensor, count: int, seed: int = 0) -> np.ndarray:
    """The clean and the sunglasses image, then seeded variants with blocky (10x10) noise.

    Fine noise never splits B and the 2 % repair; blocky noise does, on some variants.
    """
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 100, (count - 2, 3, 6, 5)).repeat(10, axis=2).repeat(10, axis=3)[:, :, :55, :47]
    faces = face_images.numpy()
    variants = faces[np.arange(count - 2) % 2] + noise
    return np.clip(np.concatenate([faces, variants]), 0, 255).astype(np.uint8)


def write_h5_set(path: Path, data: np.ndarray, labels: np.ndarray) -> Path:
    """Write a data set in the course's HDF5 layout."""
    import h5py

    with h5py.File(path, "w") as handle:
        handle["data"] = data
        handle["label"] = labels
    return path
