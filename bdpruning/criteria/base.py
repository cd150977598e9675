"""What every pruning criterion gives back: per-channel scores and a pruning order.

A criterion (Torch-Pruning's "importance") only *chooses*: it scores channels, or learns a mask
over them, and returns :class:`ChannelScores`. Pruning, the sweep, thresholds, saving B',
fine-tuning, compaction and GoodNet are shared by all criteria (:mod:`bdpruning.sweep.defense`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from ..data.forms import DataLike
from ..errors import BdpruningError
from ..graph.layers import find_layer

__all__ = ["ChannelScores", "Criterion", "check_settings", "conv_layers", "order_by"]


@dataclass
class ChannelScores:
    """A criterion's findings on one model.

    ``scores[layer][c]`` is channel ``c``'s score (what it means is ``score_name``); ``order``
    lists ``(layer, channel)`` pairs, the most suspicious first; the criterion's own choice is
    to prune ``order[:selected]``. ``points`` maps values of the criterion's parameter
    (``parameter``: CLP's ``u``, a mask threshold) to how many channels of ``order`` it prunes.
    ``keep_shift``: a pruned channel keeps its shift (the BatchNorm's beta, else the conv's
    bias) and emits that constant, as ANP's and RNP's authors prune; else it emits 0.
    ``trained_on``: indices of the clean images the criterion learned from (``[]``: none, a
    data-free criterion; None: not known). ``budget``: set when a clean-accuracy budget capped
    the choice (:mod:`bdpruning.sweep.budget`); ``budget["raw"]`` is the criterion's own.
    """

    criterion: str
    score_name: str
    scores: dict[str, list[float]]
    order: list[tuple[str, int]]
    selected: int
    parameter: str
    points: dict[float, int]
    settings: dict
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    keep_shift: bool = False
    trained_on: list[int] | None = field(default=None, repr=False)
    budget: dict | None = None

    def selection(self, count: int | None = None) -> dict[str, list[int]]:
        """``{layer: sorted channels}`` of the first ``count`` (default: the chosen) of ``order``."""
        chosen: dict[str, list[int]] = {}
        for layer, channel in self.order[: self.selected if count is None else count]:
            chosen.setdefault(layer, []).append(channel)
        return {layer: sorted(channels) for layer, channels in chosen.items()}

    def record(self) -> dict:
        """The run as JSON-ready data (``criterion.json``): settings, seconds, scores, order, choice."""
        return {
            "criterion": self.criterion, "settings": self.settings, "seconds": self.seconds,
            "score": self.score_name, "parameter": self.parameter, "keep_shift": self.keep_shift,
            "budget": self.budget, "selected": self.selected, "pruned": self.selection(),
            "points": [{self.parameter: value, "channels_pruned": count} for value, count in self.points.items()],
            "scores": self.scores,
            "order": [{"layer": layer, "channel": channel, "score": self.scores[layer][channel]}
                      for layer, channel in self.order],
            **self.extra,
        }


@runtime_checkable
class Criterion(Protocol):
    """Scores the channels of ``model`` from clean data (or none). Never sees poisoned data."""

    name: str

    def score(self, model: nn.Module, clean: DataLike | None = None) -> ChannelScores:
        """The model's channel scores; ``model`` is left unchanged."""
        ...


def check_settings(criterion: object, model: nn.Module) -> None:
    """Refuse a criterion's settings that cannot run on ``model`` (its own checks, its layers)
    before any data is read."""
    getattr(criterion, "validate", lambda: None)()
    if hasattr(criterion, "layers"):
        conv_layers(model, criterion.layers)


def conv_layers(model: nn.Module, layers: Sequence[str] | None = None) -> list[str]:
    """Module names of the conv layers a criterion covers: ``layers`` (checked), else every
    ``nn.Conv2d`` of ``model`` in definition order."""
    if layers:
        names = []
        for layer in layers:
            name, module = find_layer(model, layer)
            if not isinstance(module, nn.Conv2d):
                raise BdpruningError(f"layer {name!r} is a {type(module).__name__}, not a Conv2d")
            names.append(name)
        return names
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not names:
        raise BdpruningError(f"{type(model).__name__} has no Conv2d layer to prune")
    return names


def order_by(scores: dict[str, torch.Tensor], descending: bool) -> list[tuple[str, int]]:
    """Every ``(layer, channel)`` by score (ties: layer order, then channel index)."""
    keyed = [(float(value), position, channel, layer)
             for position, (layer, values) in enumerate(scores.items())
             for channel, value in enumerate(values.tolist())]
    keyed.sort(key=lambda item: (-item[0] if descending else item[0], item[1], item[2]))
    return [(layer, channel) for _, _, channel, layer in keyed]

