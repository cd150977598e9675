"""The lab's criterion: a channel's mean activation on clean data (low: pruned first).

The one home of the mean activation. :class:`ActivationMeans` accumulates it exactly, fed
either by a forward hook (:func:`rank_channels`, :class:`StopForward`) or by the split sweep
engine's prefix outputs (:mod:`bdpruning.sweep.split_engine`, which then keeps them for the
sweep). :class:`MeanActivation` gives the ranking in the form every criterion gives, and goes
through the same pruning loop as the others (:func:`bdpruning.sweep.loop.sweep_criterion`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.feed import model_batches
from ..data.forms import DataLike, ImageData, as_image_data, data_name
from ..errors import BdpruningError
from ..graph.fused import inference_module
from ..graph.layers import find_layer
from ..graph.split import check_fed_by
from ..numerics.exactsum import ExactChannelSums
from ..numerics.precision import runs_in_precision_context
from ..pruning.masks import channel_count
from .base import ChannelScores

__all__ = ["ActivationMeans", "ChannelRanking", "MeanActivation", "StopForward", "check_rank_layer", "ranking_of",
           "rank_channels"]


@dataclass(frozen=True)
class ChannelRanking:
    """Channels of ``layer`` by mean activation on clean data, ascending (ties by index)."""

    layer: str
    mean_activation: list[float]
    order: list[int]
    samples: int


class StopForward(Exception):
    """Raised by :meth:`ActivationMeans.stop_hook`: nothing after the ranked layer is needed."""


class ActivationMeans:
    """A layer's per-channel mean activation, accumulated batch by batch.

    The sums are exact (:class:`~bdpruning.numerics.exactsum.ExactChannelSums`), so the means, and the
    ranking, do not depend on the batching or on how many processes add to them."""

    def __init__(self) -> None:
        self.sums = ExactChannelSums()
        self.elements = 0
        self.samples = 0

    def add(self, output: torch.Tensor) -> None:
        """Add a batch of the layer's output (N, C, ...)."""
        if output.dim() < 2:
            raise BdpruningError(f"layer output has shape {tuple(output.shape)}, expected (N, C, ...)")
        self.sums.add(output)
        self.elements += output.numel() // output.shape[1]
        self.samples += output.shape[0]

    def stop_hook(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        """A forward hook: add the layer's output, then stop the forward pass (:class:`StopForward`)."""
        self.add(output)
        raise StopForward

    def ranking(self, layer: str) -> ChannelRanking:
        """The channels of ``layer`` by their mean so far, ascending (ties by index)."""
        means = self.sums.means(self.elements)
        order = sorted(range(len(means)), key=lambda c: (means[c], c))
        return ChannelRanking(layer, means, order, self.samples)


@runs_in_precision_context
@torch.inference_mode()
def rank_channels(
    model: nn.Module,
    data: DataLike,
    layer: str = "pool_3",
    batch_size: int = 512,
    progress: bool = False,
    *,
    tf32: bool = False,
) -> ChannelRanking:
    """Mean activation of each channel of ``layer`` (over images, height and width) on ``data``.

    A forward hook reads the layer's output; the rest of the forward pass is skipped. Runs on
    the model's device. ``data`` is any form :func:`~bdpruning.data.forms.as_image_data` takes.
    In IEEE fp32 unless ``tf32`` (see :func:`~bdpruning.numerics.precision.precision_context`).
    """
    name, module = find_layer(model, layer)
    means = ActivationMeans()
    data = as_image_data(data)
    total = -(-len(data) // batch_size)
    handle = module.register_forward_hook(means.stop_hook)
    try:
        model.eval()
        fast = inference_module(model)  # after the hook: the hooked layer stays as it is
        batches = model_batches(data, batch_size, model, channels_last=fast.channels_last)
        for images, _ in tqdm(batches, total=total, disable=not progress, desc=f"rank {name}", leave=False):
            try:
                fast(images)
            except StopForward:
                pass
    finally:
        handle.remove()
    return means.ranking(name)


def check_rank_layer(model: nn.Module, clean: ImageData, layer: str, rank_layer: str,
                     tf32: bool = False) -> tuple[str, str]:
    """Check that ``rank_layer`` is computed from ``layer`` (in the traced graph) and has as
    many channels; return both module names."""
    layer_name, module = find_layer(model, layer)
    rank_name, _ = find_layer(model, rank_layer)
    channels = channel_count(module)
    check_fed_by(model, layer_name, rank_name)
    with torch.inference_mode():
        probe = rank_channels(model, (clean.first_images(1), torch.zeros(1, dtype=torch.int64)), rank_name, tf32=tf32)
    if len(probe.order) != channels:
        raise BdpruningError(
            f"rank layer {rank_name!r} has {len(probe.order)} channels but {layer_name!r} has {channels}; "
            "choose a rank layer fed by the pruned layer"
        )
    return layer_name, rank_name


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

    def layers(self, model: nn.Module, clean: ImageData) -> tuple[str, str]:
        """The pruned and the rank layer's module names, checked (:func:`check_rank_layer`)."""
        return check_rank_layer(model, clean, self.layer, self.rank_layer, self.tf32)

    def score(self, model: nn.Module, clean: DataLike | None = None) -> ChannelScores:
        """Rank on ``clean`` (required)."""
        if clean is None:
            raise BdpruningError("the mean-activation criterion ranks channels on clean data: give a clean set")
        start = time.perf_counter()
        clean = as_image_data(clean)
        layer, rank_layer = self.layers(model, clean)
        ranking = rank_channels(model, clean, rank_layer, self.batch_size, tf32=self.tf32)
        return self.scores_from(ranking, layer, clean, time.perf_counter() - start)

    def scores_from(self, ranking: ChannelRanking, layer: str, clean: DataLike, seconds: float) -> ChannelScores:
        """The :class:`ChannelScores` of a ranking of ``layer``'s channels (however its means were fed)."""
        if self.count is not None and not 0 <= self.count <= len(ranking.order):
            raise BdpruningError(f"cannot prune {self.count} of {len(ranking.order)} channels")
        return ChannelScores(
            criterion=self.name, score_name=f"mean {ranking.layer} activation on clean data",
            scores={layer: [float(m) for m in ranking.mean_activation]}, order=[(layer, c) for c in ranking.order],
            selected=self.count or 0, parameter="channels", points={},
            settings={"layer": layer, "rank_layer": ranking.layer, "count": self.count, "data": data_name(clean),
                      "seed": None}, seconds=seconds,
        )


def ranking_of(scores: ChannelScores, samples: int) -> ChannelRanking:
    """The :class:`ChannelRanking` a :class:`MeanActivation` score holds (the lab's result form)."""
    (layer,) = scores.scores
    return ChannelRanking(scores.settings["rank_layer"], list(scores.scores[layer]),
                          [channel for _, channel in scores.order], samples)
