"""Shared fixtures and helpers: the real Lab-3 material in ../shared (skipped with a reason when
absent), test images whose labels hold on any machine, and the in-process ``bdprune`` runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bdpruning import load_model
from bdpruning.cli import main
from bdpruning.numerics.roundoff import float64_reference

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BD_WEIGHTS = SHARED / "models" / "lab3_bd_weights.h5"
PRUNED_FULL = SHARED / "models" / "lab3_pruned_2pct_full.h5"
CLEAN_IMAGE = SHARED / "images" / "clean_test_1.png"
POISONED_IMAGE = SHARED / "images" / "sunglass_poisoned_1.png"
N = 1283  # GoodNet's label for flagged inputs
#: conv_3 channels zeroed in lab3_pruned_2pct_full.h5 (from ../shared/README.md).
PRUNED_2PCT_CHANNELS = [0, 1, 2, 3, 6, 9, 12, 13, 14, 15, 17, *range(19, 28), *range(29, 35),
                        *range(36, 46), *range(47, 52), 53, 55, 58, 59]


def need_shared(path: Path) -> Path:
    """``path`` in ../shared, or a skip with the reason (CI has the material)."""
    if not path.exists():
        pytest.skip(f"{path} is absent: the real Lab-3 material lives in ../shared (CI has it)")
    return path


@pytest.fixture
def bd_weights() -> Path:
    return need_shared(BD_WEIGHTS)


@pytest.fixture
def pruned_full() -> Path:
    return need_shared(PRUNED_FULL)


@pytest.fixture
def face_images() -> torch.Tensor:
    """The clean and the sunglasses image as a float (2, 3, 55, 47) batch in 0..255."""
    arrays = [np.asarray(Image.open(need_shared(p)).convert("RGB")) for p in (CLEAN_IMAGE, POISONED_IMAGE)]
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


def safe_for(models: list[nn.Module], images: np.ndarray) -> np.ndarray:
    """Which images no float32 computation (any batching, backend or CPU) can give another top-1
    under any of ``models``: their float64 top-2 margin is above the round-off bound."""
    batch = np.asarray(images, dtype=np.float32)
    return np.logical_and.reduce([float64_reference(model, batch).safe for model in models])


def safe_noisy_faces(face_images: torch.Tensor, count: int, models: list[nn.Module],
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` of :func:`noisy_faces` that are safe for ``models`` (:func:`safe_for`), and
    their labels (860 for variants of the clean face, 0 for the sunglasses one)."""
    candidates = noisy_faces(face_images, 3 * count + 2, seed)
    keep = np.flatnonzero(safe_for(models, candidates))[:count]
    assert len(keep) == count, "too few noisy faces with a safe margin"
    return candidates[keep], np.where(keep % 2 == 0, 860, 0)


def rule(bd: nn.Module, repaired: nn.Module, images: torch.Tensor) -> list[int]:
    """GoodNet's labels computed independently, image by image, from the two nets' top-1."""
    labels = []
    with torch.no_grad():
        for image in images:
            b, r = bd(image[None]).argmax().item(), repaired(image[None]).argmax().item()
            labels.append(b if b == r else N)
    return labels


@pytest.fixture(scope="session")
def nets() -> tuple[nn.Module, nn.Module]:
    """B (the Lab-3 BadNet) and B' (its real 2 % repair)."""
    for path in (BD_WEIGHTS, PRUNED_FULL):
        need_shared(path)
    return load_model(BD_WEIGHTS, device="cpu"), load_model(PRUNED_FULL, device="cpu")


@pytest.fixture(scope="session")
def always_7(nets) -> nn.Module:
    """B with its output bias pushed to class 7: a 'repair' that disagrees with B almost always."""
    model = load_model(BD_WEIGHTS, device="cpu")
    with torch.no_grad():
        model.output.bias[7] += 1e4
    return model


def bdprune(capsys, *args) -> tuple[int, str, str]:
    """Run a ``bdprune`` command in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err
