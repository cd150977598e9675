"""The sweep for any pruning order, over channels of any layers: a masked forward pass, batched
and exact, that re-runs at each step only the images the step can change.

Pruning channel ``c`` of a layer makes its output exactly zero there (after the BatchNorm that
follows it, which :func:`~bdpruning.pruning.masks.prune_channels` masks too). Forward hooks on those
layers zero the pruned channels, which gives the very values of the pruned model, and record
which channels are non-zero for each image. An image whose channel ``c`` is already all zero
cannot change when ``c`` is pruned, so each step re-runs only the other images. Where the lab's
split engine (:mod:`bdpruning.sweep.split_engine`) applies it is faster; this one needs no split.
Any ascending steps can be asked for: between two of them the images where any newly pruned
channel is non-zero are re-run.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.forms import DataLike, as_image_data
from ..runtime.devices import model_input
from ..errors import BdpruningError
from ..graph.layers import find_layer
from ..pruning.masks import channel_count, following_batchnorm
from ..numerics.precision import runs_in_precision_context

__all__ = ["MaskedEngine", "masked_sweep_counts", "masked_sweep_predictions"]


class _ZeroedChannels:
    """Forward hooks that set the pruned channels of each layer (at its masked end) to what
    pruning leaves there, and record, per image, which channels differ from it: zero, or with
    ``keep_shift`` the end module's shift (its bias: what a BatchNorm whose weight is zeroed
    emits exactly, see :func:`~bdpruning.pruning.masks.prune_channels`)."""

    def __init__(self, model: nn.Module, layers: Sequence[str], keep_shift: bool = False) -> None:
        self.index = {layer: i for i, layer in enumerate(layers)}
        self.zeroed: list[list[int]] = [[] for _ in layers]
        self.active: list[torch.Tensor | None] = [None] * len(layers)
        self.fills: list[torch.Tensor | None] = []
        self.handles = []
        for i, layer in enumerate(layers):
            end = model.get_submodule(following_batchnorm(model, layer) or layer)
            bias = getattr(end, "bias", None)
            self.fills.append(bias.detach() if keep_shift and bias is not None else None)
            self.handles.append(end.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            fill = self.fills[i]
            flat_shape = (1, output.shape[1], 1)
            if self.zeroed[i]:
                index = torch.tensor(self.zeroed[i], device=output.device)
                if fill is None:
                    output = output.index_fill(1, index, 0)
                else:
                    values = fill.to(output.dtype)[index].view(1, -1, *([1] * (output.dim() - 2)))
                    output = output.index_copy(1, index, values.expand(output.shape[0], -1, *output.shape[2:])
                                               .contiguous())
            flat = output.reshape(output.shape[0], output.shape[1], -1)
            reference = 0 if fill is None else fill.to(output.dtype).view(flat_shape)
            self.active[i] = flat.ne(reference).any(dim=2)
            return output
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _check_order(model: nn.Module, order: Sequence[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[str]]:
    resolved, layers, seen = [], [], set()
    for layer, channel in order:
        name, module = find_layer(model, layer)
        if not 0 <= int(channel) < channel_count(module):
            raise BdpruningError(f"layer {name!r} has {channel_count(module)} channels; cannot prune {channel}")
        if (name, int(channel)) in seen:
            raise BdpruningError(f"channel {channel} of {name!r} appears twice in the pruning order")
        seen.add((name, int(channel)))
        resolved.append((name, int(channel)))
        if name not in layers:
            layers.append(name)
    return resolved, layers


def _steps(order: Sequence, steps: Sequence[int] | None) -> list[int]:
    chosen = sorted({int(k) for k in (range(len(order) + 1) if steps is None else steps)})
    if not chosen or chosen[0] < 0 or chosen[-1] > len(order):
        raise BdpruningError(f"steps {chosen[:1]}..{chosen[-1:]} lie outside the pruning order's 0..{len(order)}")
    return chosen


@runs_in_precision_context
@torch.inference_mode()
def masked_sweep_predictions(
    model: nn.Module, data: DataLike, order: Sequence[tuple[str, int]], steps: Sequence[int] | None = None,
    batch_size: int = 1024, progress: bool = False, *, tf32: bool = False, keep_shift: bool = False,
) -> torch.Tensor:
    """Top-1 labels with ``order[:k]`` pruned for each ``k`` of ``steps`` (default: 0 .. all of
    ``order``), in ascending order: shape ``(len(steps), N)``. In IEEE fp32 unless ``tf32``.
    ``keep_shift``: pruned channels keep their shift (as ``prune_channels(..., keep_shift=True)``)."""
    return torch.cat(list(_sweep_chunks(model, as_image_data(data), order, _steps(order, steps), batch_size,
                                        progress, labels=False, keep_shift=keep_shift)), dim=1)


@runs_in_precision_context
@torch.inference_mode()
def masked_sweep_counts(
    model: nn.Module, data: DataLike, order: Sequence[tuple[str, int]], steps: Sequence[int] | None = None,
    batch_size: int = 1024, progress: bool = False, *, tf32: bool = False, keep_shift: bool = False,
) -> list[int]:
    """How many images keep their label with ``order[:k]`` pruned, for each ``k`` of ``steps``
    (ascending; default: every step); ``keep_shift`` as :func:`masked_sweep_predictions`."""
    counts = None
    for correct in _sweep_chunks(model, as_image_data(data), order, _steps(order, steps), batch_size, progress,
                                 labels=True, keep_shift=keep_shift):
        counts = correct if counts is None else counts + correct
    return counts.tolist()


class MaskedEngine:
    """The masked sweep as an engine of :mod:`bdpruning.sweep.loop`: any layers, no split."""

    #: every step costs a re-run of the whole model on the images it can change
    sweeps_every_step = False
    masked_at = None

    def __init__(self, model: nn.Module, tf32: bool = False, keep_shift: bool = False) -> None:
        self.model, self.tf32, self.keep_shift = model, tf32, keep_shift

    def counts(self, data, order: Sequence[tuple[str, int]], steps: Sequence[int], batch_size: int,
               progress: bool, desc: str = "sweep") -> list[int]:
        """How many images keep their label with ``order[:k]`` pruned, for each ``k`` of ``steps``."""
        return masked_sweep_counts(self.model, data, order, steps, batch_size, progress, tf32=self.tf32,
                                   keep_shift=self.keep_shift)


def _sweep_chunks(model: nn.Module, data, order, steps: list[int], batch_size: int, progress: bool, labels: bool,
                  keep_shift: bool = False):
    order, layers = _check_order(model, order)
    model.eval()
    hooks = _ZeroedChannels(model, layers, keep_shift)
    total = -(-len(data) // batch_size)
    try:
        for images, targets in tqdm(data.batches(batch_size), total=total, disable=not progress, desc="sweep",
                                    leave=False):
            images = model_input(images, model)
            targets = targets.to(images.device)
            hooks.zeroed = [[] for _ in layers]
            for layer, channel in order[:steps[0]]:
                hooks.zeroed[hooks.index[layer]].append(channel)
            predictions = model(images).argmax(dim=1)
            active = [a.clone() for a in hooks.active]
            rows = [predictions]
            for previous, step in zip(steps, steps[1:]):
                changed = torch.zeros(len(images), dtype=torch.bool, device=images.device)
                for layer, channel in order[previous:step]:
                    i = hooks.index[layer]
                    changed |= active[i][:, channel]
                    hooks.zeroed[i].append(channel)
                changed = changed.nonzero().squeeze(1)
                if changed.numel():
                    predictions = predictions.clone()
                    predictions[changed] = model(images[changed]).argmax(dim=1)
                    for j, now in enumerate(hooks.active):
                        active[j][changed] = now
                rows.append(predictions)
            stacked = torch.stack(rows)
            yield (stacked == targets).sum(dim=1).cpu() if labels else stacked.cpu()
    finally:
        hooks.remove()
