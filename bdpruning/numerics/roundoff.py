"""Telling float32 round-off from a real difference: a float64 reference and a bound.

The reference is a float64 evaluation of a model's weights (for ``bdprune convert``: the
converted weights). Every float32 computation of the same function (Keras, onnxruntime, the
onnx2torch module, the named DeepID, another batching) is measured against it, in two ways:

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
elementwise op) along the deepest path (:func:`accumulation_depth`; 1,959 for DeepID). A
backend fails when some logit difference is off by more than ``2 * LAMBDA * sqrt(N) * u * S``
(two logits, each within ``delta = LAMBDA sqrt(N) u S``), a probability by more than the softmax
bound, or when its top-1 differs from the reference's on an input whose float64 top-2 margin
exceeds ``2 delta``, where round-off cannot swap the two. A rounding error is spread evenly
within ``+-u`` (standard deviation ``u / sqrt(3)``), so ``LAMBDA = 4`` is about 7 standard
deviations of the sum: a false failure from round-off is practically impossible. Measured on the
course's real DeepIDs: at most 16 u S, where the bound for DeepID is 354 u S, while a weight
off by 1e-3 moves a logit by far more (tested).

Used by ``bdprune convert``'s parity check (:mod:`bdpruning.convert.parity`) and by tests that
must hold on any machine: two float32 computations of the same function may disagree on a
top-1 label only where the float64 margin is within the bound (:attr:`Reference.safe`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import fx, nn

from ..models.outputs import logits_model
from ..graph.tracing import trace_model

__all__ = [
    "LAMBDA",
    "UNIT_ROUNDOFF",
    "BackendParity",
    "Reference",
    "accumulation_depth",
    "float64_reference",
    "measure",
]

BATCH_SIZE = 256
#: float32's unit roundoff.
UNIT_ROUNDOFF = 2.0 ** -24
#: Standard deviations of round-off allowed (see the module docstring).
LAMBDA = 4.0
#: Probabilities at or below this are not read as logits (float32 underflows near 1e-38).
_TINY = 1e-30
#: float32's smallest normal number: smaller probabilities may be flushed to zero.
_FLOAT32_TINY = 1e-37


def _fan_in(gm: fx.GraphModule, node: fx.Node) -> int:
    """Products summed into one output value of ``node`` (1 for an elementwise op)."""
    if node.op == "call_module":
        weight = getattr(gm.get_submodule(node.target), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            return int(weight[0].numel())
    constants = [a for a in node.all_input_nodes if a.op == "get_attr"]
    name = type(gm.get_submodule(node.target)).__name__ if node.op == "call_module" else str(node.target)
    if constants and "matmul" in name.lower():
        matrix = gm
        for part in constants[0].target.split("."):
            matrix = getattr(matrix, part)
        if isinstance(matrix, torch.Tensor) and matrix.dim() >= 2:
            return int(matrix.shape[-2])
    return 1


def accumulation_depth(model: nn.Module) -> int:
    """The largest sum of fan-ins along a path from the input to the output (see module doc)."""
    gm = trace_model(model)
    depth: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        before = max((depth[a] for a in node.all_input_nodes), default=0)
        simple = node.op in ("placeholder", "get_attr", "output")
        depth[node] = before + (0 if simple else _fan_in(gm, node))
    return max(depth.values())


@dataclass(frozen=True)
class Reference:
    """Float64 logits (and the softmax) of the converted weights on the checked images."""

    logits: np.ndarray
    accumulation_depth: int
    returns_logits: bool = False

    @property
    def probs(self) -> np.ndarray:
        shifted = self.logits - self.logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=1, keepdims=True)

    @property
    def scale(self) -> np.ndarray:
        """``S``: each input's largest logit magnitude (at least 1, for all-zero logits)."""
        return np.maximum(np.abs(self.logits).max(axis=1), 1.0)

    @property
    def logit_bound(self) -> np.ndarray:
        """``delta``: the round-off bound on one float32 logit of each input."""
        return LAMBDA * math.sqrt(self.accumulation_depth) * UNIT_ROUNDOFF * self.scale

    @property
    def safe(self) -> np.ndarray:
        """Inputs whose top-1 no float32 computation can change: top-2 margin above ``2 delta``."""
        if self.logits.shape[1] < 2:
            return np.ones(len(self.logits), dtype=bool)
        top2 = np.sort(self.logits, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0] > 2 * self.logit_bound


@torch.inference_mode()
def float64_reference(model: nn.Module, images: np.ndarray) -> Reference:
    """Evaluate a float64 copy of ``model`` (on CPU) on ``images``; logits under its softmax."""
    double = copy.deepcopy(model).cpu().double().eval()
    logits = logits_model(double)
    net = double if logits is None else logits
    tensor = torch.from_numpy(images).double()
    values = torch.cat([net(tensor[s:s + BATCH_SIZE]) for s in range(0, len(tensor), BATCH_SIZE)])
    returns_logits = logits is None and not _are_probabilities(values)
    if logits is None and not returns_logits:  # a softmax that fx did not recognise
        values = values.clamp_min(1e-300).log()
    return Reference(values.numpy(), accumulation_depth(model), returns_logits)


def _are_probabilities(values: torch.Tensor) -> bool:
    return bool((values >= 0).all() and (values.sum(dim=1) - 1).abs().max() < 1e-6)


@dataclass(frozen=True)
class BackendParity:
    """One float32 backend against the float64 reference (``*_ratio``: error / bound, <= 1 ok)."""

    softmax_max_abs_error: float
    softmax_bound_ratio: float
    logit_error_units: float
    logit_bound_units: float
    safe_inputs: int
    safe_top1_agreement: float
    top1_agreement: float

    @property
    def explained_by_round_off(self) -> bool:
        return (self.softmax_bound_ratio <= 1 and self.logit_error_units <= self.logit_bound_units
                and self.safe_top1_agreement == 1.0)

    def as_dict(self) -> dict:
        return {**asdict(self), "explained_by_round_off": self.explained_by_round_off}


def measure(reference: Reference, outputs: np.ndarray) -> BackendParity:
    """A backend's float32 outputs (probabilities, or logits where the model returns logits)
    against the float64 reference."""
    probs = outputs.astype(np.float64)
    if reference.returns_logits:
        probs = np.exp(probs - probs.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
    ref_probs, scale, delta = reference.probs, reference.scale, reference.logit_bound
    softmax_error = np.abs(probs - ref_probs)
    own = (LAMBDA * math.sqrt(ref_probs.shape[1]) + 4) * UNIT_ROUNDOFF  # the softmax's own sum and division
    bound = np.minimum(ref_probs, 1 - ref_probs) * np.expm1(2 * delta)[:, None] + own * ref_probs + _FLOAT32_TINY
    top = reference.logits.argmax(axis=1)
    rows = np.arange(len(top))
    readable = (probs > _TINY) & (ref_probs > _TINY) & (probs[rows, top] > _TINY)[:, None]
    with np.errstate(divide="ignore"):
        log_probs = np.log(np.where(readable, probs, 1.0))
    ours = log_probs - log_probs[rows, top][:, None]
    theirs = reference.logits - reference.logits[rows, top][:, None]
    logit_error = np.where(readable, np.abs(ours - theirs), 0.0).max(axis=1) / scale
    safe = reference.safe
    agree = probs.argmax(axis=1) == top
    return BackendParity(
        softmax_max_abs_error=float(softmax_error.max()),
        softmax_bound_ratio=float((softmax_error / bound).max()),
        logit_error_units=float(logit_error.max() / UNIT_ROUNDOFF),
        logit_bound_units=2 * LAMBDA * math.sqrt(reference.accumulation_depth),
        safe_inputs=int(safe.sum()),
        safe_top1_agreement=float(agree[safe].mean()) if safe.any() else 1.0,
        top1_agreement=float(agree.mean()),
    )


