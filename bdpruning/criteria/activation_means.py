"""Per-channel mean activations collected with forward hooks, and the pruning order they give."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.forms import DataLike, as_image_data
from ..graph.fused import inference_module
from ..data.feed import model_batches
from ..errors import BdpruningError
from ..numerics.exactsum import ExactChannelSums
from ..graph.layers import find_layer
from ..numerics.precision import runs_in_precision_context

__all__ = ["ActivationMeans", "ChannelRanking", "rank_channels", "ranking_from_sums"]


@dataclass(frozen=True)
class ChannelRanking:
    """Channels of ``layer`` by mean activation on clean data, ascending (ties by index)."""

    layer: str
    mean_activation: list[float]
    order: list[int]
    samples: int


def ranking_from_sums(layer: str, sums: torch.Tensor, elements_per_channel: int, samples: int) -> ChannelRanking:
    """Build the ranking from per-channel activation sums over ``elements_per_channel`` values."""
    means = (sums.double().cpu() / elements_per_channel).tolist()
    order = sorted(range(len(means)), key=lambda c: (means[c], c))
    return ChannelRanking(layer, means, order, samples)


class ActivationMeans:
    """The one place a layer's per-channel mean activation is accumulated: :func:`rank_channels`
    feeds it from a forward hook, the sweep from its cached prefix outputs.

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

    def ranking(self, layer: str) -> ChannelRanking:
        """The channels of ``layer`` by their mean so far, ascending (ties by index)."""
        means = self.sums.means(self.elements)
        order = sorted(range(len(means)), key=lambda c: (means[c], c))
        return ChannelRanking(layer, means, order, self.samples)


class _StopForward(Exception):
    """Raised by the hook: nothing after the ranked layer is needed."""


def channel_sums(output: torch.Tensor) -> torch.Tensor:
    """Sum of ``output`` (N, C, ...) over every axis but the channel axis, in float64."""
    if output.dim() < 2:
        raise BdpruningError(f"layer output has shape {tuple(output.shape)}, expected (N, C, ...)")
    return output.detach().double().transpose(0, 1).reshape(output.shape[1], -1).sum(dim=1)


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

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        means.add(output)
        raise _StopForward

    data = as_image_data(data)
    total = -(-len(data) // batch_size)
    handle = module.register_forward_hook(hook)
    try:
        model.eval()
        fast = inference_module(model)  # after the hook: the hooked layer stays as it is
        batches = model_batches(data, batch_size, model, channels_last=fast.channels_last)
        for images, _ in tqdm(batches, total=total, disable=not progress, desc=f"rank {name}", leave=False):
            try:
                fast(images)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return means.ranking(name)
