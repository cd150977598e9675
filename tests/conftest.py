"""Fixtures only (helpers live in the ``helpers`` package): the real Lab-3 material in ../shared
(skipped with a reason when absent), B and its repairs, and data sets several test files share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bdpruning import load_model
from helpers.conditions import need_shared
from helpers.data import jittered_faces, safe_noisy_faces, write_h5_set
from helpers.material import BD_WEIGHTS, CLEAN_IMAGE, POISONED_IMAGE, PRUNED_FULL


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


@pytest.fixture(scope="session")
def face_set(tmp_path_factory) -> Path:
    """120 :func:`helpers.data.jittered_faces` as an HDF5 set (labels 860 and 0)."""
    need_shared(CLEAN_IMAGE), need_shared(POISONED_IMAGE)
    data, labels = jittered_faces(120, seed=0)
    return write_h5_set(tmp_path_factory.mktemp("faces") / "faces.h5", data, labels)


@pytest.fixture(scope="session")
def random_pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """45 random uint8 3 x 48 x 40 images (the input of :class:`helpers.nets.IntNet`), 4 classes."""
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (45, 3, 48, 40), dtype=np.uint8)
    return torch.from_numpy(data), torch.from_numpy(rng.integers(0, 4, 45))


@pytest.fixture(scope="session")
def random_pixels_h5(tmp_path_factory, random_pixels) -> str:
    """:func:`random_pixels` as an HDF5 set, by path."""
    data, labels = random_pixels
    return str(write_h5_set(tmp_path_factory.mktemp("forms") / "set.h5", data.numpy(), labels.numpy()))


@pytest.fixture
def safe_set(tmp_path, face_images, nets, always_7):
    """(path, images, labels): 11 images (odd) whose labels no float32 round-off can change
    under B, B' or always-7."""
    images, labels = safe_noisy_faces(face_images, 11, [*nets, always_7])
    return write_h5_set(tmp_path / "safe.h5", images, labels), images, labels
