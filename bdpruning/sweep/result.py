"""What a pruning sweep measured, and the accuracy-drop thresholds: one home for every engine
and every criterion.

:func:`sweep_outcome` turns correct counts along a criterion's order into a
:class:`DefenseResult`: the steps, the first step whose drop reaches each threshold (B'_T), and
the criterion's own choice (:attr:`DefenseResult.chosen`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Sequence

from ..criteria.base import ChannelScores
from ..errors import BdpruningError
from ..numerics.precision import precision_record

__all__ = ["ThresholdHit", "DefenseStep", "DefenseResult", "check_thresholds", "find_thresholds", "last_step",
           "sweep_outcome"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThresholdHit:
    """Where the accuracy drop first reached ``threshold`` points (``step`` None: never)."""

    threshold: float
    step: int | None
    clean_accuracy: float | None = None
    attack_success_rate: float | None = None
    fraction_pruned: float | None = None

    @property
    def reached(self) -> bool:
        return self.step is not None


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
    the last threshold when thresholds are given), and where it and the thresholds land.

    ``all_steps`` holds every evaluated step (beyond the last threshold too); ``masked_at`` is
    where the sweep engine found a pruned channel exactly zero (see :mod:`bdpruning.sweep.loop`)."""

    scores: ChannelScores
    steps: list[DefenseStep]
    thresholds: list[ThresholdHit]
    clean_samples: int
    poisoned_samples: int | None
    full_sweep: bool
    precision: dict = field(default_factory=dict)
    all_steps: list[DefenseStep] = field(repr=False, default_factory=list)
    masked_at: str | None = None

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


def check_thresholds(thresholds: Sequence[float], *, required: bool = True) -> None:
    """Refuse a threshold that is not a positive number of points (or none, when ``required``)."""
    if (required and not thresholds) or any(not t > 0 for t in thresholds):
        raise BdpruningError(f"thresholds must be positive numbers of points, got {list(thresholds)}")


def find_thresholds(correct: Sequence[int], total: int, thresholds: Sequence[float]) -> list[int | None]:
    """For each threshold T (points), the first step whose accuracy drop is at least T.

    Computed on integer counts, so a drop of exactly T points counts as reached.
    """
    hits = []
    for threshold in thresholds:
        t = Fraction(str(threshold))
        hit = next((k for k in range(1, len(correct)) if (correct[0] - correct[k]) * 100 >= t * total), None)
        hits.append(hit)
    return hits


def last_step(correct: Sequence[int], total: int, thresholds: Sequence[float], wanted: int, full_sweep: bool) -> int:
    """The last step a sweep reports: the last threshold reached (or ``wanted``, if later);
    the last counted step with ``full_sweep`` or when a threshold is never reached."""
    hits = find_thresholds(correct, total, thresholds)
    return len(correct) - 1 if full_sweep or None in hits else max([wanted, *hits])


def sweep_outcome(scores: ChannelScores, evaluated: Sequence[int], correct: Sequence[int],
                  poisoned_correct: Sequence[int] | None, clean_count: int, poisoned_count: int | None,
                  thresholds: Sequence[float], full_sweep: bool, reported: int | None = None,
                  masked_at: str | None = None) -> DefenseResult:
    """The :class:`DefenseResult` of correct counts at the ``evaluated`` steps of ``scores.order``
    (ascending, from 0). With ``thresholds`` the evaluated steps are consecutive; ``steps``
    then stop at step ``reported`` (default: every evaluated step)."""
    order, total = scores.order, len(scores.order)
    steps: list[DefenseStep] = []
    for index, (k, count) in enumerate(zip(evaluated, correct)):
        accuracy = 100.0 * count / clean_count
        layer, channel = order[k - 1] if k else (None, None)
        steps.append(DefenseStep(
            step=k, layer=layer, channel=channel, score=scores.scores[layer][channel] if k else None,
            fraction_pruned=k / total if total else 0.0, clean_accuracy=accuracy,
            attack_success_rate=None if poisoned_correct is None else 100.0 * poisoned_correct[index] / poisoned_count,
            accuracy_drop=steps[0].clean_accuracy - accuracy if steps else 0.0,
        ))
    hits = find_thresholds(correct, clean_count, thresholds) if thresholds else []
    found = [ThresholdHit(t, k, steps[k].clean_accuracy, steps[k].attack_success_rate, steps[k].fraction_pruned)
             if k is not None else ThresholdHit(t, None) for t, k in zip(thresholds, hits)]
    for hit in found:
        if not hit.reached:
            log.warning("accuracy never dropped by %g points: no repaired model for that threshold", hit.threshold)
    shown = steps if reported is None else steps[: reported + 1]
    return DefenseResult(scores, shown, found, clean_count, poisoned_count, full_sweep, precision_record(),
                         steps, masked_at)
