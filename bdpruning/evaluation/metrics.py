"""Evaluation metrics as exact counts: what each batch contributes, and the rates in percent.

A batch comes from the clean set or from the poisoned set (whose ``label`` holds the attacker's
target). :func:`evaluation_outcomes` and :func:`goodnet_outcomes` say, per image, which counts
it adds to; :class:`Count` sums them (int64, sum-reduced across processes by torchmetrics);
:func:`evaluation_rates` and :func:`goodnet_rates` turn the counts into percentages.
"""

from __future__ import annotations

import torch

from .goodnet import goodnet_labels

__all__ = [
    "Count",
    "EVALUATION_COUNTS",
    "GOODNET_COUNTS",
    "evaluation_outcomes",
    "goodnet_outcomes",
    "evaluation_rates",
    "goodnet_rates",
    "percent",
]

#: Counts behind :func:`evaluation_rates`.
EVALUATION_COUNTS = ("clean_images", "clean_correct", "poisoned_images", "attack_successes")
#: Counts behind :func:`goodnet_rates`.
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


def evaluation_rates(counts: dict[str, int]) -> dict[str, float | None]:
    """Clean accuracy and attack success rate (ASR), in percent."""
    clean, poisoned = counts.get("clean_images", 0), counts.get("poisoned_images", 0)
    return {
        "clean_accuracy": percent(counts.get("clean_correct", 0), clean),
        "attack_success_rate": percent(counts.get("attack_successes", 0), poisoned),
    }


def goodnet_rates(counts: dict[str, int]) -> dict[str, float | None]:
    """B' clean accuracy and ASR, GoodNet clean accuracy and ASR, detection and false-alarm rates."""
    clean, poisoned = counts.get("clean_images", 0), counts.get("poisoned_images", 0)
    return {
        **evaluation_rates(counts),
        "goodnet_clean_accuracy": percent(counts.get("goodnet_clean_correct", 0), clean),
        "goodnet_attack_success_rate": percent(counts.get("goodnet_attack_successes", 0), poisoned),
        "detection_rate": percent(counts.get("poisoned_flagged", 0), poisoned),
        "false_alarm_rate": percent(counts.get("clean_flagged", 0), clean),
    }
