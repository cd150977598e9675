"""Numerical parity that tells float32 round-off from a conversion error.

The judgement itself (the float64 reference and the bound) lives in :mod:`bdpruning.roundoff`;
this module runs each backend (Keras, onnxruntime, PyTorch) on the same images.

The reference is a float64 evaluation of the converted weights. Every backend (Keras,
onnxruntime, the onnx2torch module, the named DeepID) runs in float32 and is measured against
it, in two ways:

* **logits**, relative to the input's largest logit ``S = max_i |z_i|``, in float32 units
  ``u = 2**-24``. A backend that returns probabilities is read through its log-probabilities:
  ``log p_i - log p_t = z_i - z_t`` (``t`` the reference's top-1), on the classes whose
  probability is representable (``p > 1e-30`` in both).
* **softmax**, against the bound that the logit bound implies: if every logit is off by at most
  ``delta``, every probability ``p`` moves by at most ``min(p, 1 - p) * (exp(2 delta) - 1)``;
  the softmax's own sum of ``C`` exponentials and its division add ``(LAMBDA sqrt(C) + 4) u p``.

**The bound.** A float32 inner product of length ``n`` has a relative error of order
``sqrt(n) u`` (probabilistic rounding-error analysis, Higham & Mary 2019: rounding errors are
independent and mean-zero, so they add in quadrature; the worst case ``n u`` is reached only by
adversarial inputs). Errors made in successive layers add up along the longest path from the
input to the output, so ``n`` is the network's *accumulation depth* ``N``: the sum of the
fan-ins (``in_channels * kh * kw`` for a convolution, ``in_features`` for a dense layer, 1 for an
elementwise op) along the deepest path (:func:`accumulation_depth`; DeepID: 48 + 180 + 360 +
240 + 960 + 160 + 3 = 1951). A backend fails when some logit difference is off by more than
``2 * LAMBDA * sqrt(N) * u * S`` (two logits, each within ``LAMBDA sqrt(N) u S``), a probability
by more than the softmax bound, or when its top-1 differs from the reference's on an
input whose float64 top-2 margin exceeds ``2 delta``, where round-off cannot swap the two.
``LAMBDA = 8`` makes a false failure from round-off practically impossible (the probability
that a sum of independent roundings exceeds 8 of its standard deviations is below 1e-14);
measured errors on the course's real DeepIDs stay below 12 u S, where the bound for DeepID
is 707 u S, while a wrong weight moves the logits by orders of magnitude more.

Inputs come from a data set or seeded random pixels (image files: :mod:`bdpruning.images`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..data import read_h5_dataset
from ..roundoff import (LAMBDA, UNIT_ROUNDOFF, BackendParity, Reference, accumulation_depth,  # noqa: F401
                        float64_reference, measure)

__all__ = [
    "Agreement",
    "compare",
    "LAMBDA",
    "UNIT_ROUNDOFF",
    "BackendParity",
    "Reference",
    "accumulation_depth",
    "float64_reference",
    "measure",
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
