"""The prune stage's files, for every criterion: ``sweep.csv``, ``sweep.json``, ``summary.json``
(plus ``criterion.json`` for criteria other than the lab's), and the repaired models B'."""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from torch import nn

from ..models.directory import save_model_dir
from ..models.keras_h5 import write_keras_copy
from ..pruning.masks import prune_channels
from ..sweep.lab import SweepResult
from ..sweep.result import DefenseResult
from .summary import CriterionSummary, LabSummary, RunInputs, chosen_dirname, threshold_dirname

__all__ = ["threshold_dirname", "chosen_dirname", "write_rows_csv", "write_sweep_results", "write_defense_results",
           "save_pruned_copy", "save_repaired_models", "save_defense_models", "summary_dict"]

log = logging.getLogger(__name__)

_LAB_COLUMNS = ["step", "channel", "fraction_pruned", "clean_accuracy", "attack_success_rate", "accuracy_drop"]
_CRITERION_COLUMNS = ["step", "layer", "channel", "score", "fraction_pruned", "clean_accuracy",
                      "attack_success_rate", "accuracy_drop"]


def write_rows_csv(rows: list[dict], path: str | os.PathLike[str], columns: list[str]) -> None:
    """Write ``rows`` as CSV with ``columns`` (None written as an empty cell, other keys left out)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def summary_dict(result: SweepResult, extra: dict | None = None) -> dict:
    """The lab's summary as JSON-ready data (see :class:`~.summary.LabSummary`), then ``extra``."""
    return {**LabSummary.of(result).to_dict(), **(extra or {})}


def write_sweep_results(result: SweepResult, directory: str | os.PathLike[str],
                        inputs: RunInputs | None = None) -> LabSummary:
    """The lab's files: ``sweep.csv``, ``sweep.json`` (with the ranking) and ``summary.json``."""
    directory = Path(directory)
    rows = [asdict(step) for step in result.steps]
    write_rows_csv(rows, directory / "sweep.csv", _LAB_COLUMNS)
    ranking = [{"rank": i, "channel": c, "mean_activation": result.ranking.mean_activation[c]}
               for i, c in enumerate(result.ranking.order)]
    _write_json(directory / "sweep.json", {"layer": result.layer, "rank_layer": result.rank_layer,
                                           "masked_at": result.masked_at, "ranking": ranking, "steps": rows})
    summary = LabSummary.of(result, inputs)
    (directory / "summary.json").write_text(summary.to_json())
    return summary


def write_defense_results(result: DefenseResult, directory: str | os.PathLike[str],
                          inputs: RunInputs | None = None) -> CriterionSummary:
    """A criterion's files: ``criterion.json``, ``sweep.csv``, ``sweep.json`` and ``summary.json``."""
    directory = Path(directory)
    rows = [asdict(step) for step in result.steps]
    write_rows_csv(rows, directory / "sweep.csv", _CRITERION_COLUMNS)
    _write_json(directory / "criterion.json", result.scores.record())
    _write_json(directory / "sweep.json", {"criterion": result.scores.criterion, "steps": rows})
    summary = CriterionSummary.of(result, inputs)
    (directory / "summary.json").write_text(summary.to_json())
    return summary


def save_pruned_copy(model: nn.Module, pruned: dict[str, list[int]], target: Path, extra: dict,
                     keep_shift: bool = False) -> bool:
    """Save a copy of ``model`` with ``pruned`` (``{layer: channels}``) pruned into the new
    directory ``target``: a model directory, plus ``model.h5`` when the model came from a DeepID
    Keras file (its layout, pruned channels zeroed). ``keep_shift``: the pruned channels keep
    their shift (see :func:`~bdpruning.pruning.masks.prune_channels`). Returns whether
    ``model.h5`` was written."""
    repaired = copy.deepcopy(model)
    for layer, channels in pruned.items():
        prune_channels(repaired, layer, channels, keep_shift=keep_shift)
    target.mkdir()
    save_model_dir(repaired, target, extra=extra)
    return write_keras_copy(repaired, target / "model.h5")


def _save_all(model: nn.Module, directory: Path, targets: list[tuple[str, dict, dict]],
              keep_shift: bool = False) -> None:
    keras_copies = [save_pruned_copy(model, pruned, directory / name, extra, keep_shift)
                    for name, pruned, extra in targets]
    if not all(keras_copies):
        log.info("no Keras .h5 written for the repaired models: the source is not a DeepID .h5 file")


def save_repaired_models(model: nn.Module, result: SweepResult, directory: Path) -> None:
    """Save the lab's B'_T for every reached threshold (see :func:`save_pruned_copy`)."""
    _save_all(model, directory, [
        (threshold_dirname(hit.threshold), {result.layer: result.ranking.order[: hit.step]},
         {"threshold": hit.threshold, "step": hit.step,
          "clean_accuracy": hit.clean_accuracy, "attack_success_rate": hit.attack_success_rate})
        for hit in result.thresholds if hit.reached])


def save_defense_models(model: nn.Module, result: DefenseResult, directory: Path) -> None:
    """Save the criterion's B' (``repaired_<criterion>/``) and B'_T for every reached threshold."""
    scores = result.scores
    targets = []
    if scores.selected:
        targets.append((chosen_dirname(scores.criterion), scores.selected, {}))
    else:
        log.warning("%s chose no channel: no repaired model of its own", scores.criterion)
    targets += [(threshold_dirname(hit.threshold), hit.step, {"threshold": hit.threshold})
                for hit in result.thresholds if hit.reached]
    _save_all(model, directory, [
        (name, scores.selection(step), {**extra, "criterion": scores.criterion, "step": step,
                                        "clean_accuracy": result.at(step).clean_accuracy,
                                        "attack_success_rate": result.at(step).attack_success_rate})
        for name, step, extra in targets], keep_shift=scores.keep_shift)
