"""Numerical parity: the same NCHW 0..255 images through Keras, onnxruntime and PyTorch.

Each backend returns its outputs as numpy arrays; the judgement (a float64 reference of the
converted weights and a round-off bound from the network's depth and width) lives in
:mod:`bdpruning.numerics.roundoff`. Inputs come from a data set or seeded random pixels (image files:
:mod:`bdpruning.data.images`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..data.hdf5 import read_h5_dataset

__all__ = [
    "Agreement",
    "compare",
    "random_images",
    "dataset_images",
    "keras_probs",
    "onnxruntime_session",
    "onnxruntime_probs",
    "torch_probs",
]

BATCH_SIZE = 256


@dataclass(frozen=True)
class Agreement:
    """How closely one output follows another: largest absolute difference, equal top-1 share."""

    max_abs_diff: float
    argmax_agreement: float


def compare(reference: np.ndarray, other: np.ndarray) -> Agreement:
    """Largest absolute output difference and the fraction of equal top-1 labels."""
    return Agreement(
        max_abs_diff=float(np.max(np.abs(reference - other))),
        argmax_agreement=float(np.mean(reference.argmax(axis=1) == other.argmax(axis=1))),
    )


def random_images(count: int, shape: Sequence[int], seed: int) -> np.ndarray:
    """``count`` seeded random images (float32 NCHW, integer pixel values 0..255)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, *shape)).astype(np.float32)


def dataset_images(
    path: str | os.PathLike[str], shape: Sequence[int], num_classes: int, limit: int | None
) -> np.ndarray:
    """The first ``limit`` (default: all) images of a validated HDF5 data set."""
    dataset = read_h5_dataset(path, num_classes=num_classes, image_shape=shape)
    return dataset.read(0, min(len(dataset), limit or len(dataset))).numpy()


def keras_probs(model: Any, images: np.ndarray) -> np.ndarray:
    """Keras ``predict`` on NCHW images (transposed to the NHWC that Keras takes)."""
    nhwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    return np.asarray(model.predict(nhwc, batch_size=BATCH_SIZE, verbose=0), dtype=np.float32)


def onnxruntime_session(onnx_bytes: bytes) -> Any:
    """An onnxruntime CPU session for an ONNX graph with input ``input``."""
    import onnxruntime

    return onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])


def onnxruntime_probs(session: Any, images: np.ndarray) -> np.ndarray:
    """onnxruntime on NCHW images (``session`` from :func:`onnxruntime_session`)."""
    batches = [
        session.run(None, {"input": images[start:start + BATCH_SIZE]})[0]
        for start in range(0, len(images), BATCH_SIZE)
    ]
    return np.concatenate(batches).astype(np.float32)


@torch.inference_mode()
def torch_probs(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """A PyTorch module (on its own device) on NCHW images."""
    device = next(model.parameters()).device
    tensor = torch.from_numpy(images)
    batches = [
        model(tensor[start:start + BATCH_SIZE].to(device)).cpu()
        for start in range(0, len(images), BATCH_SIZE)
    ]
    return torch.cat(batches).numpy()
