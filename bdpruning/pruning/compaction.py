"""Compaction: remove a repaired model's pruned channels for real, keeping its outputs.

A masked model still computes every pruned channel and multiplies it by zero. Compaction
removes the channels and what consumes them (for DeepID: ``conv_3`` output channels, ``conv_4``
input channels and ``fc_1`` columns), found by :mod:`.dependency` in the traced graph. The
result is a plain, smaller ``nn.Module`` of the same class that saves, reloads, exports to ONNX
and serves as B' in GoodNet like any repaired model::

    model = bdpruning.load_model("runs/pruning/repaired_4pct")
    removed = compact_model(model)       # {"conv_3": [channels]}; model is now smaller
    print(model_cost(model))             # parameters and FLOPs per image
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .dependency import ChannelGroup, remove_channels
from .masks import plain_state_dict, pruned_selection, shift_kept_layers
from ..models.record import model_info
from ..errors import BdpruningError

__all__ = ["ModelCost", "compact_model", "model_cost", "example_input"]


@dataclass
class ModelCost:
    """What a model costs: stored weights (parameters and constant matrices) and FLOPs per image."""

    parameters: int
    flops: int


def example_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """A zero batch of the model's input shape, on its device, in its parameters' dtype."""
    parameter = next(model.parameters())
    return torch.zeros(batch, *model_info(model).input_shape, device=parameter.device, dtype=parameter.dtype)


def model_cost(model: nn.Module) -> ModelCost:
    """Parameters (BatchNorm statistics and masks not counted) and FLOPs of one image's forward
    pass (multiply and add counted apart, as torch.utils.flop_counter does)."""
    weights = [value for key, value in plain_state_dict(model).items()
               if value.is_floating_point() and not key.endswith(("running_mean", "running_var"))]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(example_input(model))
    return ModelCost(sum(w.numel() for w in weights), int(counter.get_total_flops()))


def compact_model(model: nn.Module, layer: str = "conv_3") -> list[ChannelGroup]:
    """Remove the pruned channels of ``model`` in place; return the groups that shrank.

    Pruned channels are those of its masked layers, or for a model without masks the all-zero
    channels of ``layer`` (see :func:`bdpruning.pruning.masks.pruned_selection`). The removal is recorded in
    the model's info, so :func:`bdpruning.save_model_dir` saves a directory that reloads compact.
    """
    kept = shift_kept_layers(model)
    if kept:
        raise BdpruningError(f"the pruned channels of {', '.join(kept)} keep their shift (as ANP and RNP prune) and "
                             "emit a constant: removing them would change the model's outputs")
    steps = list(pruned_selection(model, layer).items())
    groups = remove_channels(model, steps, example_input(model))
    info = model_info(model)
    info.removed = [*info.removed, *steps]
    return groups
