"""The lab's sweep: the mean-activation criterion through the one pruning loop, reported in
the lab's form (one layer, its ranking, every step).

:func:`run_sweep` is :func:`~bdpruning.sweep.loop.sweep_criterion` with
:class:`~bdpruning.criteria.activation.MeanActivation`: the split engine ranks the channels
from its prefix outputs and re-runs only the suffix at each step
(:mod:`bdpruning.sweep.split_engine`); :class:`SweepResult` is the lab's view of the result.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..criteria.activation import ChannelRanking, MeanActivation, ranking_of
from ..criteria.base import ChannelScores
from ..data.forms import DataLike, as_image_data
from ..evaluation.predict import predict_labels
from ..numerics.precision import runs_in_precision_context
from ..pruning.masks import prune_channels
from .loop import sweep_criterion
from .result import DefenseResult, ThresholdHit, check_thresholds, find_thresholds, last_step, sweep_outcome
from .split_engine import sweep_predictions

__all__ = [
    "SweepStep", "ThresholdHit", "SweepResult", "run_sweep", "lab_result", "sweep_result",
    "naive_sweep_predictions", "check_thresholds", "find_thresholds", "sweep_predictions",
]


@dataclass(frozen=True)
class SweepStep:
    """One step: ``channels_pruned`` channels removed, the last being ``channel``."""

    step: int
    channel: int | None
    fraction_pruned: float
    clean_accuracy: float
    attack_success_rate: float | None
    accuracy_drop: float


@dataclass
class SweepResult:
    """Everything a sweep measured; ``steps`` stop at the last threshold unless full."""

    layer: str
    rank_layer: str
    ranking: ChannelRanking
    steps: list[SweepStep]
    thresholds: list[ThresholdHit]
    clean_samples: int
    poisoned_samples: int | None
    masked_at: str
    full_sweep: bool
    all_steps: list[SweepStep] = field(repr=False, default_factory=list)
    precision: dict = field(default_factory=dict)  # precision_record() of the run


def lab_result(result: DefenseResult) -> SweepResult:
    """The lab's view of a :class:`MeanActivation` sweep of every step."""
    scores = result.scores
    every = [SweepStep(s.step, s.channel, s.fraction_pruned, s.clean_accuracy, s.attack_success_rate,
                       s.accuracy_drop) for s in result.all_steps]
    return SweepResult(scores.settings["layer"], scores.settings["rank_layer"],
                       ranking_of(scores, result.clean_samples), every[: len(result.steps)], result.thresholds,
                       result.clean_samples, result.poisoned_samples, result.masked_at, result.full_sweep, every,
                       result.precision)


@runs_in_precision_context
def run_sweep(
    model: nn.Module,
    clean: DataLike,
    poisoned: DataLike | None = None,
    *,
    layer: str = "conv_3",
    rank_layer: str = "pool_3",
    thresholds: Sequence[float] = (2.0, 4.0, 10.0),
    full_sweep: bool = False,
    batch_size: int = 1024,
    cache_bytes: int = 1 << 30,
    progress: bool = False,
    tf32: bool = False,
) -> SweepResult:
    """Rank ``layer``'s channels on ``clean`` by ``rank_layer``'s mean activation, then prune
    them one by one, recording clean accuracy and (with ``poisoned``) the attack success rate.
    Everything runs in IEEE fp32 unless ``tf32`` (see :func:`~bdpruning.numerics.precision.precision_context`).

    ``clean`` and ``poisoned`` take any form of :func:`~bdpruning.data.forms.as_image_data`;
    ``rank_layer`` must be computed from ``layer`` (checked in the traced graph)."""
    check_thresholds(thresholds)
    criterion = MeanActivation(layer, rank_layer, batch_size=batch_size, tf32=tf32)
    return lab_result(sweep_criterion(model, criterion, clean, poisoned, thresholds=thresholds, full_sweep=full_sweep,
                                      every_step=True, batch_size=batch_size, cache_bytes=cache_bytes,
                                      progress=progress, tf32=tf32))


def sweep_result(scores: ChannelScores, clean_correct: Sequence[int], poisoned_correct: Sequence[int] | None,
                 clean_count: int, poisoned_count: int | None, thresholds: Sequence[float], full_sweep: bool,
                 masked_at: str) -> SweepResult:
    """The lab's :class:`SweepResult` of a :class:`MeanActivation` score and the correct counts
    at every step (step 0: nothing pruned) on ``clean_count`` clean and ``poisoned_count``
    poisoned images (the data-parallel sweep counts them itself)."""
    reported = last_step(clean_correct, clean_count, thresholds, 0, full_sweep)
    return lab_result(sweep_outcome(scores, range(len(clean_correct)), clean_correct, poisoned_correct, clean_count,
                                    poisoned_count, thresholds, full_sweep, reported, masked_at))


@runs_in_precision_context
@torch.inference_mode()
def naive_sweep_predictions(
    model: nn.Module, dataset: DataLike, order: Sequence[int], layer: str = "conv_3", batch_size: int = 1024,
    *, tf32: bool = False,
) -> torch.Tensor:
    """The reference procedure: a full forward of the masked model at every step (slow)."""
    dataset = as_image_data(dataset)
    rows = [predict_labels(model, dataset, batch_size, tf32=tf32)]
    for step in range(1, len(order) + 1):
        pruned = prune_channels(copy.deepcopy(model), layer, order[:step])
        rows.append(predict_labels(pruned, dataset, batch_size, tf32=tf32))
    return torch.stack(rows)
