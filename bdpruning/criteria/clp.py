"""CLP, Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022): data-free.

Channel ``k`` of a conv layer gets the upper bound of its Lipschitz constant: the largest
singular value of its kernel reshaped to ``(in_channels, kh * kw)``, times ``|gamma_k / sigma_k|``
when a BatchNorm follows (``sigma_k = sqrt(running_var_k + eps)``, the BatchNorm's actual
divisor). In each layer the channels whose bound exceeds ``mean + u * std`` of that layer are
pruned (``std``: the sample standard deviation, as the authors' code)::

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
def clp_bounds(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """``{conv layer: per-channel Lipschitz upper bounds (float64)}`` for ``layers`` (default: every conv)."""
    names = conv_layers(model, layers)
    modules = dict(model.named_modules())
    bounds = {}
    for name in names:
        weight = modules[name].weight.detach().double().cpu()
        kernels = weight.reshape(weight.shape[0], weight.shape[1], -1)  # (out, in, kh * kw)
        bound = torch.linalg.matrix_norm(kernels, ord=2)
        norm = following_batchnorm(model, name)
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
    """The CLP criterion: prune channels whose bound exceeds their layer's mean + ``u`` std."""

    u: float = DEFAULT_U
    layers: Sequence[str] | None = None
    name: str = "clp"

    def score(self, model: nn.Module, clean: DataLike | None = None) -> ChannelScores:
        """Score every channel by its standardized bound; ``clean`` is not used (CLP is data-free)."""
        if not self.u == self.u:  # NaN
            raise BdpruningError("u must be a number")
        start = time.perf_counter()
        bounds = clp_bounds(model, self.layers)
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
            settings={"u": self.u, "layers": list(bounds), "data": None, "seed": None}, seconds=seconds,
            extra={"bounds": {layer: values.tolist() for layer, values in bounds.items()}},
        )
