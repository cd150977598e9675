"""CLP, Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022): data-free, as its
authors' code runs it (rkteddy/channel-Lipschitzness-based-pruning, ``defense.py``).

Channel ``k`` of a conv layer followed by a BatchNorm gets the upper bound of its Lipschitz
constant: the largest singular value of its kernel reshaped to ``(in_channels, kh * kw)``, times
``|gamma_k / sigma_k|`` (``defense.py`` lines 15-24; ``sigma_k = sqrt(running_var_k + eps)``,
the BatchNorm's actual divisor, where the authors leave out ``eps``). In each layer the channels
whose bound exceeds ``mean + u * std`` of that layer are pruned (line 26; ``std``: the sample
standard deviation, as ``torch.std``), by zeroing the BatchNorm's weight *and* bias (lines
28-29): the pruned channel emits 0.

The authors cover only convs followed by a BatchNorm (line 15; their issue #5 about other
convs is unanswered). ``convs_without_batchnorm=True`` is our extension: such a conv's bound is
its kernel's alone. On the demo DeepID (no BatchNorm) it is what removed two healthy channels
and left 10.6 % clean accuracy (issue 17's measurement). A net without any BatchNorm gets a
one-line warning and, by default, no channel::

    scores = CLP(u=3).score(model)          # no data
    scores.selection()                       # {"conv_3": [17], ...}
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..data.forms import DataLike
from ..errors import BdpruningError
from ..pruning.masks import following_batchnorm
from .base import ChannelScores, conv_layers, order_by

__all__ = ["CLP", "DEFAULT_U", "U_POINTS", "clp_bounds", "standardized"]

log = logging.getLogger(__name__)

#: CLP's default threshold, in standard deviations above the layer's mean bound.
DEFAULT_U = 3.0
#: The values of ``u`` whose accuracy and ASR a sweep reports.
U_POINTS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0)


@torch.no_grad()
def clp_bounds(model: nn.Module, layers: Sequence[str] | None = None,
               convs_without_batchnorm: bool = True) -> dict[str, torch.Tensor]:
    """``{conv layer: per-channel Lipschitz upper bounds (float64)}`` for ``layers`` (default:
    every conv; only those followed by a BatchNorm unless ``convs_without_batchnorm``)."""
    names = conv_layers(model, layers)
    modules = dict(model.named_modules())
    bounds = {}
    for name in names:
        norm = following_batchnorm(model, name)
        if norm is None and not convs_without_batchnorm:
            continue
        weight = modules[name].weight.detach().double().cpu()
        kernels = weight.reshape(weight.shape[0], weight.shape[1], -1)  # (out, in, kh * kw)
        bound = torch.linalg.matrix_norm(kernels, ord=2)
        if norm is not None:
            bn = modules[norm]
            if bn.running_var is None:
                raise BdpruningError(f"BatchNorm {norm!r} keeps no running statistics")
            sigma = (bn.running_var.detach().double().cpu() + bn.eps).sqrt()
            gamma = bn.weight.detach().double().cpu() if bn.weight is not None else torch.ones_like(sigma)
            bound = bound * (gamma / sigma).abs()
        bounds[name] = bound
    return bounds


def standardized(bounds: torch.Tensor) -> torch.Tensor:
    """``(bound - mean) / std`` within a layer; zeros when the layer's bounds do not vary."""
    if bounds.numel() < 2:
        return torch.zeros_like(bounds)
    std = bounds.std()
    return torch.zeros_like(bounds) if not std > 0 else (bounds - bounds.mean()) / std


@dataclass
class CLP:
    """The CLP criterion: prune channels whose bound exceeds their layer's mean + ``u`` std
    (default 3, the authors' ``test.py`` line 73). ``convs_without_batchnorm`` is ours (see the module)."""

    u: float = DEFAULT_U
    layers: Sequence[str] | None = None
    convs_without_batchnorm: bool = False
    name: str = "clp"

    def score(self, model: nn.Module, clean: DataLike | None = None) -> ChannelScores:
        """Score every channel by its standardized bound; ``clean`` is not used (CLP is data-free)."""
        if not self.u == self.u:  # NaN
            raise BdpruningError("u must be a number")
        start = time.perf_counter()
        bounds = clp_bounds(model, self.layers, self.convs_without_batchnorm)
        if not bounds:
            log.warning("CLP: no conv layer is followed by a BatchNorm, and CLP (as its authors) covers only those: "
                        "no channel chosen (convs_without_batchnorm=True, --clp-all-convs, extends it)")
        z = {layer: standardized(values) for layer, values in bounds.items()}
        order = order_by(z, descending=True)
        above = lambda u: sum(int((values > u).sum()) for values in z.values())  # noqa: E731
        points = {u: above(u) for u in sorted({*U_POINTS, float(self.u)})}
        seconds = time.perf_counter() - start
        log.info("CLP (u = %g): %d of %d channels above their layer's mean + u std", self.u, above(self.u), len(order))
        return ChannelScores(
            criterion=self.name, score_name="standardized Lipschitz bound (std above the layer mean)",
            scores={layer: values.tolist() for layer, values in z.items()}, order=order,
            selected=above(self.u), parameter="u", points=points,
            settings={"u": self.u, "layers": list(bounds), "convs_without_batchnorm": self.convs_without_batchnorm,
                      "data": None, "seed": None}, seconds=seconds,
            extra={"bounds": {layer: values.tolist() for layer, values in bounds.items()}}, trained_on=[],
        )
