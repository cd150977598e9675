"""``bdprune prune --criterion clp|anp|rnp`` as one call: load, score, sweep, write results,
repaired models and plots. The lab's criterion (``activation``) keeps :mod:`.prune`.

The output directory holds ``criterion.json`` (the criterion's settings, seed, wall time,
every channel's score and its order), ``sweep.csv`` / ``sweep.json`` (one row per evaluated
step along that order), ``summary.json`` (baseline; the criterion's own choice, saved as
``repaired_<criterion>/``, e.g. ``repaired_clp/``; accuracy and ASR per value of the criterion's parameter; with thresholds, every
reached accuracy-drop threshold, saved as ``repaired_<T>pct/`` as in the lab), ``accuracy_asr.png`` and ``scores.png``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from torch import nn

from ..runtime.atomic import atomic_dir, prepare_out_dir
from ..criteria.base import Criterion
from ..sweep.defense import DefenseResult, run_defense
from .prune import load_inputs, save_pruned_copy
from .writers import threshold_dirname, write_rows_csv

__all__ = ["chosen_dirname", "defend_model", "save_defense", "write_defense_results", "save_defense_models"]

log = logging.getLogger(__name__)

def chosen_dirname(criterion: str) -> str:
    """Directory of a criterion's own B': ``repaired_clp``, ``repaired_anp``, ..."""
    return f"repaired_{criterion}"

_COLUMNS = ["step", "layer", "channel", "score", "fraction_pruned", "clean_accuracy", "attack_success_rate",
            "accuracy_drop"]


def _entry(result: DefenseResult, step: int) -> dict:
    base, at = result.steps[0], result.at(step)
    return {"step": step, "channels_pruned": step, "fraction_pruned": at.fraction_pruned,
            "clean_accuracy": at.clean_accuracy, "attack_success_rate": at.attack_success_rate,
            "accuracy_drop": base.clean_accuracy - at.clean_accuracy,
            "pruned_channels": result.scores.selection(step)}


def defense_summary(result: DefenseResult, extra: dict | None = None) -> dict:
    """The summary: baseline, the criterion's choice, the thresholds and the parameter values."""
    scores, base = result.scores, result.steps[0]
    chosen = {scores.parameter: scores.settings.get("u", scores.settings.get("threshold")),
              **_entry(result, scores.selected),
              "model_dir": chosen_dirname(scores.criterion) if scores.selected else None}
    thresholds = []
    for hit in result.thresholds:
        entry = {"threshold": hit.threshold, "reached": hit.reached}
        if hit.reached:
            entry.update(_entry(result, hit.step), model_dir=threshold_dirname(hit.threshold))
        thresholds.append(entry)
    return {
        "criterion": scores.criterion, "settings": scores.settings, "seconds": scores.seconds,
        "layers": list(scores.scores), "channels": len(scores.order),
        "clean_samples": result.clean_samples, "poisoned_samples": result.poisoned_samples,
        "baseline": {"clean_accuracy": base.clean_accuracy, "attack_success_rate": base.attack_success_rate},
        "chosen": chosen, "thresholds": thresholds, "points": result.points(),
        "full_sweep": result.full_sweep, "steps_recorded": len(result.steps) - 1, "precision": result.precision,
        **(extra or {}),
    }


def write_defense_results(result: DefenseResult, directory: str | os.PathLike[str], extra: dict | None = None) -> dict:
    """Write ``criterion.json``, ``sweep.csv``, ``sweep.json`` and ``summary.json``; return the summary."""
    directory = Path(directory)
    rows = [asdict(step) for step in result.steps]
    write_rows_csv(rows, directory / "sweep.csv", _COLUMNS)
    (directory / "criterion.json").write_text(json.dumps(result.scores.record(), indent=2) + "\n")
    (directory / "sweep.json").write_text(json.dumps({"criterion": result.scores.criterion, "steps": rows},
                                                     indent=2) + "\n")
    summary = defense_summary(result, extra)
    (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


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
    for name, step, extra in targets:
        at = result.at(step)
        save_pruned_copy(model, scores.selection(step), directory / name, {
            **extra, "criterion": scores.criterion, "step": step,
            "clean_accuracy": at.clean_accuracy, "attack_success_rate": at.attack_success_rate})


def defend_model(
    model_path: str | os.PathLike[str],
    clean_valid: str | os.PathLike[str],
    out: str | os.PathLike[str],
    criterion: Criterion,
    *,
    poisoned_valid: str | os.PathLike[str] | None = None,
    thresholds: Sequence[float] = (),
    full_sweep: bool = False,
    device: str = "auto",
    batch_size: int = 1024,
    force: bool = False,
    progress: bool = True,
    tf32: bool = False,
) -> dict | None:
    """Run ``criterion``'s defense and write everything to ``out`` atomically; return the
    summary (None in the extra processes of a ``ddp`` launch). The criterion sees only
    ``clean_valid``; ``poisoned_valid`` only gives the ASR."""
    out = prepare_out_dir(out, force)
    model, clean, poisoned = load_inputs(model_path, clean_valid, poisoned_valid, device)
    result = run_defense(model, criterion, clean, poisoned, thresholds=thresholds, full_sweep=full_sweep,
                         batch_size=batch_size, progress=progress, tf32=tf32)
    if result is None:
        return None
    return save_defense(result, model, out, force=force, extra={
        "model": str(model_path), "clean_valid": str(clean_valid),
        "poisoned_valid": None if poisoned_valid is None else str(poisoned_valid),
        "device": str(next(model.parameters()).device)})


def save_defense(result: DefenseResult, model: nn.Module, out: str | os.PathLike[str], *, force: bool = False,
                 extra: dict | None = None) -> dict:
    """Write a defense's results, repaired models (from the unpruned ``model`` it ran on) and
    plots into ``out`` atomically (see the module docstring); return the summary.

    Raises :class:`~bdpruning.BdpruningError` when ``out`` exists (unless ``force``) or the
    model has no bdpruning record (see :func:`bdpruning.adopt`)."""
    from .. import plots
    from ..models import model_info

    out = prepare_out_dir(out, force)
    model_info(model)  # refuse an unrecorded model before anything is written
    model = model.eval()
    with atomic_dir(out) as directory:
        summary = write_defense_results(result, directory, extra=extra)
        save_defense_models(model, result, directory)
        steps, scores = result.steps, result.scores
        plots.plot_sweep(
            [s.fraction_pruned for s in steps], [s.clean_accuracy for s in steps],
            None if result.poisoned_samples is None else [s.attack_success_rate for s in steps],
            [(h.threshold, h.fraction_pruned) for h in result.thresholds], directory / "accuracy_asr.png",
            layer="all covered conv layers", marks=[(scores.criterion, scores.selected / len(scores.order))],
        )
        plots.plot_scores(scores.order, scores.scores, directory / "scores.png",
                          f"{scores.criterion}: {scores.score_name}", scores.selected)
    log.info("%s results written to %s", scores.criterion, out)
    return summary
