"""Conditions a test runs under: material that must be present, images whose labels hold on any
machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch import nn

from bdpruning.numerics.roundoff import float64_reference


def need_shared(path: Path) -> Path:
    """``path`` in ../shared, or a skip with the reason (CI has the material)."""
    if not path.exists():
        pytest.skip(f"{path} is absent: the real Lab-3 material lives in ../shared (CI has it)")
    return path


def safe_for(models: list[nn.Module], images: np.ndarray) -> np.ndarray:
    """Which images no float32 computation (any batching, backend or CPU) can give another top-1
    under any of ``models``: their float64 top-2 margin is above the round-off bound."""
    batch = np.asarray(images, dtype=np.float32)
    return np.logical_and.reduce([float64_reference(model, batch).safe for model in models])
