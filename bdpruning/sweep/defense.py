"""The shared act of pruning for any criterion: score, sweep the criterion's order, find the
accuracy-drop thresholds, and the criterion's own choice.

A criterion (:mod:`bdpruning.criteria`) only chooses; this module prunes and measures::

    result = run_defense(model, CLP(u=3), clean_valid, poisoned_valid)
    result.chosen          # the criterion's own B': channels pruned, clean accuracy, ASR
    result.points()        # accuracy and ASR for each u
    result = run_defense(model, ANP(), clean_valid, poisoned_valid, thresholds=(2, 4, 10))
    result.thresholds      # B'_T as in the lab: the first step whose accuracy drop reaches T

The criterion sees the clean set only; poisoned data is only used to report the ASR. The sweep
is :func:`~bdpruning.sweep.masked.masked_sweep_counts` (exact, any layers), evaluated at the
criterion's choice and every reported value of its parameter, and with thresholds at every step
up to the last one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

from ..criteria.base import ChannelScores, Criterion
from ..data.forms import DataLike, as_image_data, model_expectations
from ..errors import BdpruningError
from .masked import masked_sweep_counts
from ..numerics.precision import precision_record, runs_in_precision_context
from .lab import ThresholdHit, find_thresholds

__all__ = ["DefenseStep", "DefenseResult", "run_defense", "defense_sweep"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DefenseStep:
    """``step`` channels of the criterion's order pruned, the last being ``channel`` of ``layer``."""

    step: int
    layer: str | None
    channel: int | None
    score: float | None
    fraction_pruned: float
    clean_accuracy: float
    attack_success_rate: float | None
    accuracy_drop: float


@dataclass
class DefenseResult:
    """The criterion's scores, the evaluated steps along its order (ascending; every step up to
    the last threshold when thresholds are given), and where it and the thresholds land."""

    scores: ChannelScores
    steps: list[DefenseStep]
    thresholds: list[ThresholdHit]
    clean_samples: int
    poisoned_samples: int | None
    full_sweep: bool
    precision: dict = field(default_factory=dict)

    def at(self, step: int) -> DefenseStep:
        """The evaluated step ``step``."""
        return next(s for s in self.steps if s.step == step)

    @property
    def chosen(self) -> DefenseStep:
        """The criterion's own choice (always evaluated)."""
        return self.at(self.scores.selected)

    def points(self) -> list[dict]:
        """Per value of the criterion's parameter: channels pruned, clean accuracy and ASR."""
        rows = []
        for value, count in self.scores.points.items():
            at = self.at(count)
            rows.append({self.scores.parameter: value, "channels_pruned": count,
                         "clean_accuracy": at.clean_accuracy, "attack_success_rate": at.attack_success_rate})
        return rows


def _consecutive(model: nn.Module, order: list, clean, thresholds: Sequence[float], wanted: int, full_sweep: bool,
                 batch_size: int, progress: bool, tf32: bool) -> list[int]:
    """Clean counts at every step from 0, in doubling blocks, until ``wanted`` and every
    threshold are reached (or to the end)."""
    correct: list[int] = []
    block, total = 16, len(order)
    while True:
        start = max(len(correct) - 1, 0)
        stop = total if full_sweep else min(total, max(start + block, wanted))
        correct = correct[:start] + masked_sweep_counts(model, clean, order, range(start, stop + 1), batch_size,
                                                         progress, tf32=tf32)
        hits = find_thresholds(correct, len(clean), thresholds)
        if stop == total or (len(correct) > wanted and None not in hits):
            break
        block *= 2
    if not full_sweep and None not in hits:  # as the lab's sweep: stop at the last threshold
        correct = correct[:max([wanted, *hits]) + 1]
    return correct


@runs_in_precision_context
def defense_sweep(
    model: nn.Module, scores: ChannelScores, clean: DataLike, poisoned: DataLike | None = None, *,
    thresholds: Sequence[float] = (), full_sweep: bool = False, batch_size: int = 1024,
    progress: bool = False, tf32: bool = False,
) -> DefenseResult:
    """Prune along ``scores.order`` and measure; in IEEE fp32 unless ``tf32``.

    Evaluated: the criterion's choice and every reported value of its parameter; with
    ``thresholds`` (accuracy drops in points) every step up to the last one reached (to the end
    when one is never reached, or with ``full_sweep``), as the lab's sweep."""
    if any(not t > 0 for t in thresholds):
        raise BdpruningError(f"thresholds must be positive numbers of points, got {list(thresholds)}")
    clean = as_image_data(clean, **model_expectations(model))
    poisoned = None if poisoned is None else as_image_data(poisoned, **model_expectations(model))
    order, total = scores.order, len(scores.order)
    wanted = sorted({0, scores.selected, *scores.points.values()})
    if thresholds or full_sweep:
        consecutive = _consecutive(model, order, clean, thresholds, wanted[-1], full_sweep, batch_size, progress,
                                   tf32)
        evaluated = list(range(len(consecutive)))
        correct = consecutive
    else:
        evaluated = wanted
        correct = masked_sweep_counts(model, clean, order, evaluated, batch_size, progress, tf32=tf32)
    poisoned_correct = None
    if poisoned is not None:
        poisoned_correct = masked_sweep_counts(model, poisoned, order, evaluated, batch_size, progress, tf32=tf32)
    steps = []
    for index, (k, count) in enumerate(zip(evaluated, correct)):
        accuracy = 100.0 * count / len(clean)
        layer, channel = order[k - 1] if k else (None, None)
        steps.append(DefenseStep(
            step=k, layer=layer, channel=channel, score=scores.scores[layer][channel] if k else None,
            fraction_pruned=k / total, clean_accuracy=accuracy,
            attack_success_rate=None if poisoned_correct is None else 100.0 * poisoned_correct[index] / len(poisoned),
            accuracy_drop=steps[0].clean_accuracy - accuracy if steps else 0.0,
        ))
    hits = find_thresholds(correct, len(clean), thresholds) if thresholds else []
    found = [ThresholdHit(t, k, steps[k].clean_accuracy, steps[k].attack_success_rate, steps[k].fraction_pruned)
             if k is not None else ThresholdHit(t, None) for t, k in zip(thresholds, hits)]
    for hit in found:
        if not hit.reached:
            log.warning("accuracy never dropped by %g points: no repaired model for that threshold", hit.threshold)
    return DefenseResult(scores, steps, found, len(clean), None if poisoned is None else len(poisoned),
                         full_sweep, precision_record())


def run_defense(
    model: nn.Module, criterion: Criterion, clean: DataLike, poisoned: DataLike | None = None, *,
    thresholds: Sequence[float] = (), full_sweep: bool = False, batch_size: int = 1024,
    progress: bool = False, tf32: bool = False,
) -> DefenseResult | None:
    """Score ``model``'s channels with ``criterion`` on ``clean`` (it never sees ``poisoned``),
    then :func:`defense_sweep`. ``model`` is left unchanged. Returns None in the extra
    processes of a ``ddp`` launch of a training criterion."""
    scores = criterion.score(model, clean)
    if scores is None:
        return None
    log.info("%s chose %d of %d channels", scores.criterion, scores.selected, len(scores.order))
    return defense_sweep(model, scores, clean, poisoned, thresholds=thresholds, full_sweep=full_sweep,
                         batch_size=batch_size, progress=progress, tf32=tf32)
