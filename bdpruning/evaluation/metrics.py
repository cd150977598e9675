"""Evaluation metrics as exact counts: what each batch contributes, and the rates in percent.

A batch comes from the clean set or from the poisoned set (whose ``label`` holds the attacker's
target). :func:`evaluation_outcomes` and :func:`goodnet_outcomes` say, per image, which counts
it adds to; :class:`Count` sums them (int64, sum-reduced across processes by torchmetrics);
:class:`EvaluationResult` and :class:`GoodNetResult` hold the summed counts and give the rates
in percent (``to_json()``: the results files' rows).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .goodnet import goodnet_labels

__all__ = [
    "Count",
    "EvaluationResult",
    "GoodNetResult",
    "EVALUATION_COUNTS",
    "GOODNET_COUNTS",
    "evaluation_outcomes",
    "goodnet_outcomes",
    "evaluation_rates",
    "percent",
]

#: Counts behind :class:`EvaluationResult`.
EVALUATION_COUNTS = ("clean_images", "clean_correct", "poisoned_images", "attack_successes")
#: Counts behind :class:`GoodNetResult`.
GOODNET_COUNTS = EVALUATION_COUNTS + (
    "clean_flagged", "goodnet_clean_correct", "poisoned_flagged", "goodnet_attack_successes",
)


def evaluation_outcomes(predicted: torch.Tensor, labels: torch.Tensor, poisoned: bool) -> dict[str, torch.Tensor]:
    """Per-image flags for one batch of a model's top-1 ``predicted`` labels."""
    hits = predicted == labels
    if poisoned:
        return {"poisoned_images": torch.ones_like(hits), "attack_successes": hits}
    return {"clean_images": torch.ones_like(hits), "clean_correct": hits}


def goodnet_outcomes(
    bd_predicted: torch.Tensor, repaired_predicted: torch.Tensor, labels: torch.Tensor, num_classes: int,
    poisoned: bool,
) -> dict[str, torch.Tensor]:
    """Per-image flags for one batch: B' as a model, and GoodNet (B, B'); a flag is an error."""
    goodnet = goodnet_labels(bd_predicted, repaired_predicted, num_classes)
    flagged = goodnet == num_classes
    outcomes = evaluation_outcomes(repaired_predicted, labels, poisoned)
    if poisoned:
        return {**outcomes, "poisoned_flagged": flagged, "goodnet_attack_successes": goodnet == labels}
    return {**outcomes, "clean_flagged": flagged, "goodnet_clean_correct": goodnet == labels}


def __getattr__(name: str):
    # Count is a torchmetrics Metric, imported on first use: importing torchmetrics costs
    # seconds (it imports torchvision), which commands that do not run Lightning skip
    if name == "Count":
        from .count_metric import Count

        return Count
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def percent(hits: int, total: int) -> float | None:
    """``100 * hits / total``, or None for an empty set."""
    return 100.0 * hits / total if total else None


def _rate(hits: str, total: str, doc: str) -> property:
    """A property: ``percent`` of two count fields (an absent count reads as 0)."""
    return property(lambda self: percent(getattr(self, hits) or 0, getattr(self, total) or 0), doc=doc)


@dataclass(frozen=True)
class EvaluationResult:
    """One model's exact counts on the clean set (and the poisoned set, None without one), and
    its clean accuracy and attack success rate (ASR) in percent."""

    clean_images: int = 0
    clean_correct: int = 0
    poisoned_images: int | None = None
    attack_successes: int | None = None

    clean_accuracy = _rate("clean_correct", "clean_images", "Clean accuracy in percent.")
    attack_success_rate = _rate("attack_successes", "poisoned_images", "ASR in percent (None without poisoned images).")

    @classmethod
    def of(cls, counts: dict[str, int]) -> EvaluationResult:
        """From counts named as in :data:`EVALUATION_COUNTS` (absent: not counted)."""
        return cls(**{name: counts[name] for name in EVALUATION_COUNTS if name in counts})

    def counts(self) -> dict[str, int]:
        """The counts that were taken, by name."""
        return {name: value for name, value in asdict(self).items() if value is not None}

    def rates(self) -> dict[str, float | None]:
        """Clean accuracy and ASR by name."""
        return {"clean_accuracy": self.clean_accuracy, "attack_success_rate": self.attack_success_rate}

    def to_json(self) -> dict[str, int | float | None]:
        """The counts that were taken, then the two rates."""
        return {**self.counts(), **self.rates()}


def evaluation_rates(counts: dict[str, int]) -> dict[str, float | None]:
    """Clean accuracy and attack success rate (ASR), in percent."""
    return EvaluationResult.of(counts).rates()


@dataclass(frozen=True)
class GoodNetResult:
    """The exact counts of one repaired model B' and of GoodNet(B, B') (a flagged input counts
    as an error), and their rates in percent."""

    clean_images: int = 0
    clean_correct: int = 0
    poisoned_images: int = 0
    attack_successes: int = 0
    clean_flagged: int = 0
    goodnet_clean_correct: int = 0
    poisoned_flagged: int = 0
    goodnet_attack_successes: int = 0

    clean_accuracy = _rate("clean_correct", "clean_images", "B''s clean accuracy.")
    attack_success_rate = _rate("attack_successes", "poisoned_images", "B''s ASR.")
    goodnet_clean_accuracy = _rate("goodnet_clean_correct", "clean_images", "GoodNet's clean accuracy.")
    goodnet_attack_success_rate = _rate("goodnet_attack_successes", "poisoned_images", "GoodNet's ASR.")
    detection_rate = _rate("poisoned_flagged", "poisoned_images", "Poisoned inputs flagged.")
    false_alarm_rate = _rate("clean_flagged", "clean_images", "Clean inputs flagged.")

    @classmethod
    def of(cls, counts: dict[str, int]) -> GoodNetResult:
        """From counts named as in :data:`GOODNET_COUNTS` (absent: zero)."""
        return cls(**{name: counts.get(name, 0) for name in GOODNET_COUNTS})

    def to_json(self) -> dict[str, float | None]:
        """The six rates (a row of ``goodnet.json`` without the model's name)."""
        names = ("clean_accuracy", "attack_success_rate", "goodnet_clean_accuracy", "goodnet_attack_success_rate",
                 "detection_rate", "false_alarm_rate")
        return {name: getattr(self, name) for name in names}
