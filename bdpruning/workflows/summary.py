"""The prune stage's summaries as types: what ``summary.json`` holds and the command prints.

:class:`LabSummary` (the lab's criterion) and :class:`CriterionSummary` (any other) share their
parts; ``to_json()`` writes ``summary.json`` exactly as the stage always has."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Union

from ..sweep.lab import SweepResult
from ..sweep.result import DefenseResult, DefenseStep

__all__ = ["Baseline", "StepEntry", "ThresholdEntry", "ChosenEntry", "RunInputs", "LabSummary", "CriterionSummary",
           "PruneSummary", "threshold_dirname", "chosen_dirname"]


def threshold_dirname(threshold: float) -> str:
    """Directory of the repaired model for a threshold: ``repaired_2pct``, ``repaired_2.5pct``."""
    return f"repaired_{threshold:g}pct"


def chosen_dirname(criterion: str) -> str:
    """Directory of a criterion's own B': ``repaired_clp``, ``repaired_anp``, ..."""
    return f"repaired_{criterion}"


@dataclass(frozen=True)
class Baseline:
    """Clean accuracy and ASR (None without poisoned data) with nothing pruned, in percent."""

    clean_accuracy: float
    attack_success_rate: float | None

    def to_dict(self) -> dict:
        return {"clean_accuracy": self.clean_accuracy, "attack_success_rate": self.attack_success_rate}


@dataclass(frozen=True)
class StepEntry:
    """One reported step: ``step`` channels pruned (``pruned_channels``: a list of one layer's
    channels, or ``{layer: channels}``), its metrics, and its saved model's directory."""

    step: int
    fraction_pruned: float
    clean_accuracy: float
    attack_success_rate: float | None
    accuracy_drop: float
    pruned_channels: list[int] | dict[str, list[int]]
    model_dir: str | None

    @property
    def channels_pruned(self) -> int:
        return self.step

    @classmethod
    def of(cls, at: DefenseStep, pruned_channels, model_dir: str | None) -> StepEntry:
        return cls(at.step, at.fraction_pruned, at.clean_accuracy, at.attack_success_rate, at.accuracy_drop,
                   pruned_channels, model_dir)

    def to_dict(self) -> dict:
        return {"step": self.step, "channels_pruned": self.step, "fraction_pruned": self.fraction_pruned,
                "clean_accuracy": self.clean_accuracy, "attack_success_rate": self.attack_success_rate,
                "accuracy_drop": self.accuracy_drop, "pruned_channels": self.pruned_channels,
                "model_dir": self.model_dir}


@dataclass(frozen=True)
class ThresholdEntry:
    """An accuracy-drop threshold (points) and where it was first reached (``at`` None: never)."""

    threshold: float
    at: StepEntry | None

    @property
    def reached(self) -> bool:
        return self.at is not None

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "reached": self.reached, **(self.at.to_dict() if self.at else {})}


@dataclass(frozen=True)
class ChosenEntry:
    """A criterion's own choice: its parameter's value and the step it prunes to."""

    parameter: str
    value: float | None
    at: StepEntry

    def to_dict(self) -> dict:
        return {self.parameter: self.value, **self.at.to_dict()}


@dataclass(frozen=True)
class RunInputs:
    """What the stage ran on: the model, the validation sets, the device."""

    model: str
    clean_valid: str
    poisoned_valid: str | None
    device: str

    def to_dict(self) -> dict:
        return {"model": self.model, "clean_valid": self.clean_valid, "poisoned_valid": self.poisoned_valid,
                "device": self.device}


def _thresholds(result: SweepResult | DefenseResult, pruned) -> tuple[ThresholdEntry, ...]:
    steps = result.all_steps
    return tuple(ThresholdEntry(hit.threshold, StepEntry.of(steps[hit.step], pruned(hit.step),
                                                            threshold_dirname(hit.threshold))
                                if hit.reached else None) for hit in result.thresholds)


def _dumps(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


@dataclass(frozen=True)
class LabSummary:
    """The lab's sweep: baseline, and for every threshold the step, channels and metrics there."""

    layer: str
    rank_layer: str
    channels: int
    clean_samples: int
    poisoned_samples: int | None
    baseline: Baseline
    thresholds: tuple[ThresholdEntry, ...]
    full_sweep: bool
    steps_recorded: int
    inputs: RunInputs | None = None
    precision: dict | None = None

    @classmethod
    def of(cls, result: SweepResult, inputs: RunInputs | None = None) -> LabSummary:
        base = result.all_steps[0]
        order = result.ranking.order
        return cls(result.layer, result.rank_layer, len(order), result.clean_samples, result.poisoned_samples,
                   Baseline(base.clean_accuracy, base.attack_success_rate),
                   _thresholds(result, lambda step: order[:step]), result.full_sweep, len(result.steps) - 1,
                   inputs, result.precision if inputs else None)

    def to_dict(self) -> dict:
        run = {**self.inputs.to_dict(), "precision": self.precision} if self.inputs else {}
        return {"layer": self.layer, "rank_layer": self.rank_layer, "channels": self.channels,
                "clean_samples": self.clean_samples, "poisoned_samples": self.poisoned_samples,
                "baseline": self.baseline.to_dict(), "thresholds": [t.to_dict() for t in self.thresholds],
                "full_sweep": self.full_sweep, "steps_recorded": self.steps_recorded, **run}

    def to_json(self) -> str:
        """``summary.json``'s text."""
        return _dumps(self.to_dict())


def _budget(result: DefenseResult) -> dict | None:
    """The budget record, with the criterion's raw choice measured beside the budgeted one."""
    budget = result.scores.budget
    if budget is None:
        return None
    raw = result.at(budget["raw"])
    return {**budget, "raw_clean_accuracy": raw.clean_accuracy, "raw_attack_success_rate": raw.attack_success_rate}


@dataclass(frozen=True)
class CriterionSummary:
    """Any criterion's sweep: baseline, its own choice, the thresholds and its parameter's values."""

    criterion: str
    settings: dict
    seconds: float
    layers: tuple[str, ...]
    channels: int
    clean_samples: int
    poisoned_samples: int | None
    baseline: Baseline
    chosen: ChosenEntry
    thresholds: tuple[ThresholdEntry, ...]
    points: tuple[dict, ...]
    full_sweep: bool
    steps_recorded: int
    precision: dict
    inputs: RunInputs | None = None
    budget: dict | None = None  # the clean-accuracy budget and the raw choice it capped

    @classmethod
    def of(cls, result: DefenseResult, inputs: RunInputs | None = None) -> CriterionSummary:
        scores, base = result.scores, result.steps[0]
        chosen = ChosenEntry(scores.parameter, scores.settings.get("u", scores.settings.get("threshold")),
                             StepEntry.of(result.chosen, scores.selection(scores.selected),
                                          chosen_dirname(scores.criterion) if scores.selected else None))
        return cls(scores.criterion, scores.settings, scores.seconds, tuple(scores.scores), len(scores.order),
                   result.clean_samples, result.poisoned_samples,
                   Baseline(base.clean_accuracy, base.attack_success_rate), chosen,
                   _thresholds(result, scores.selection), tuple(result.points()), result.full_sweep,
                   len(result.steps) - 1, result.precision, inputs, _budget(result))

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "settings": self.settings, "seconds": self.seconds,
                "layers": list(self.layers), "channels": self.channels, "clean_samples": self.clean_samples,
                "poisoned_samples": self.poisoned_samples, "baseline": self.baseline.to_dict(),
                "chosen": self.chosen.to_dict(), "thresholds": [t.to_dict() for t in self.thresholds],
                "points": list(self.points), "full_sweep": self.full_sweep, "steps_recorded": self.steps_recorded,
                "precision": self.precision, "budget": self.budget,
                **(self.inputs.to_dict() if self.inputs else {})}

    def to_json(self) -> str:
        """``summary.json``'s text."""
        return _dumps(self.to_dict())


#: What the prune stage returns.
PruneSummary = Union[LabSummary, CriterionSummary]
