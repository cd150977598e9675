"""The lab's criterion: a channel's mean activation on clean data (low: pruned first).

The mean itself has one home, :class:`bdpruning.criteria.activation_means.ActivationMeans`: both
:func:`~bdpruning.criteria.activation_means.rank_channels` (forward hooks) and the sweep (from its cached
prefix outputs) accumulate through it. This object gives the same ranking the form every
criterion gives; ``bdprune prune`` (``--criterion activation``, the default) runs the lab's
single-layer sweep and writes its files exactly as before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .activation_means import rank_channels
from ..data.forms import DataLike, data_name
from ..errors import BdpruningError
from ..graph.layers import find_layer
from .base import ChannelScores

__all__ = ["MeanActivation"]


@dataclass
class MeanActivation:
    """Channels of ``layer`` ranked by the mean activation of ``rank_layer``; the choice is the
    ``count`` lowest (None: none; the lab's sweep picks by accuracy-drop thresholds instead)."""

    layer: str = "conv_3"
    rank_layer: str = "pool_3"
    count: int | None = None
    batch_size: int = 512
    tf32: bool = False
    name: str = "activation"

    def score(self, model: nn.Module, clean: DataLike | None = None) -> ChannelScores:
        """Rank on ``clean`` (required)."""
        if clean is None:
            raise BdpruningError("the mean-activation criterion ranks channels on clean data: give a clean set")
        start = time.perf_counter()
        layer, _ = find_layer(model, self.layer)
        ranking = rank_channels(model, clean, self.rank_layer, self.batch_size, tf32=self.tf32)
        if self.count is not None and not 0 <= self.count <= len(ranking.order):
            raise BdpruningError(f"cannot prune {self.count} of {len(ranking.order)} channels")
        means = torch.tensor(ranking.mean_activation)
        return ChannelScores(
            criterion=self.name, score_name=f"mean {ranking.layer} activation on clean data",
            scores={layer: means.tolist()}, order=[(layer, c) for c in ranking.order],
            selected=self.count or 0, parameter="channels", points={},
            settings={"layer": layer, "rank_layer": ranking.layer, "count": self.count, "data": data_name(clean),
                      "seed": None}, seconds=time.perf_counter() - start,
        )
