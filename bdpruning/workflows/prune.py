"""The prune stage as one call, for every criterion: load, score, sweep, write results, repaired
models and plots (``bdprune prune``).

The lab's criterion (no ``criterion``: mean activation of one layer) writes ``sweep.csv``,
``sweep.json`` (with the ranking), ``summary.json`` (baseline; every accuracy-drop threshold,
saved as ``repaired_<T>pct/``), ``accuracy_asr.png`` and ``activations.png``. Any other
criterion writes ``criterion.json`` (its settings, seed, wall time, every channel's score and
its order), ``sweep.csv`` / ``sweep.json`` (one row per evaluated step along that order),
``summary.json`` (baseline; its own choice, saved as ``repaired_<criterion>/``, e.g.
``repaired_clp/``; accuracy and ASR per value of its parameter; with thresholds, every reached
threshold, saved as ``repaired_<T>pct/`` as in the lab), ``accuracy_asr.png`` and ``scores.png``.
Both sweep through the one loop (:mod:`bdpruning.sweep.loop`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from torch import nn

from ..criteria.base import Criterion, check_settings
from ..data.forms import as_image_data
from ..data.hdf5 import H5ImageSet, read_h5_dataset
from ..evaluation.predict import predict_labels
from ..models import model_info
from ..evaluation.chance import check_not_chance
from ..models.loading import load_model
from ..runtime.atomic import atomic_dir, prepare_out_dir
from ..runtime.trainer_options import TrainerOptions
from ..sweep.lab import SweepResult, run_sweep
from ..sweep.loop import sweep_criterion
from ..sweep.result import DefenseResult
from .summary import CriterionSummary, LabSummary, PruneSummary, RunInputs, threshold_dirname
from .writers import save_defense_models, save_repaired_models, write_defense_results, write_sweep_results

__all__ = ["load_inputs", "prune_stage", "prune_model", "defend_model", "save_repaired", "save_defense"]

log = logging.getLogger(__name__)

#: Clean images a first look at the baseline reads before the sweep starts.
FIRST_LOOK = 1024


def load_inputs(model_path: str | os.PathLike[str], clean_valid: str | os.PathLike[str],
                poisoned_valid: str | os.PathLike[str] | None, device: str,
                model_options: dict | None = None) -> tuple[nn.Module, H5ImageSet, H5ImageSet | None]:
    """The model (``model_options``: :func:`~bdpruning.models.loading.load_model`'s ``outputs`` and
    ``input_range``) and the validation sets, checked against its classes and input shape."""
    model = load_model(model_path, device=device, **(model_options or {}))
    info = model_info(model)
    clean = read_h5_dataset(clean_valid, info.num_classes, info.input_shape)
    poisoned = read_h5_dataset(poisoned_valid, info.num_classes, info.input_shape) if poisoned_valid else None
    return model, clean, poisoned


def check_first_look(model: nn.Module, clean: H5ImageSet, where: str) -> None:
    """Refuse a model whose baseline on the first :data:`FIRST_LOOK` clean images is at chance
    level (:func:`~bdpruning.evaluation.chance.check_not_chance`), before a sweep spends its time."""
    images, labels = next(as_image_data(clean).batches(FIRST_LOOK))
    correct = int((predict_labels(model, (images, labels), FIRST_LOOK) == labels.cpu()).sum())
    check_not_chance(correct, len(labels), model_info(model).num_classes,
                     where=f"{where} (its first {len(labels)} images)")


def prune_stage(
    model_path: str | os.PathLike[str],
    clean_valid: str | os.PathLike[str],
    out: str | os.PathLike[str],
    criterion: Criterion | None = None,
    *,
    poisoned_valid: str | os.PathLike[str] | None = None,
    thresholds: Sequence[float] | None = None,
    layer: str = "conv_3",
    rank_layer: str = "pool_3",
    full_sweep: bool = False,
    device: str = "auto",
    batch_size: int = 1024,
    force: bool = False,
    progress: bool = True,
    tf32: bool = False,
    trainer_options: TrainerOptions | dict | None = None,
    max_accuracy_drop: float | None = None,
    model_options: dict | None = None,
    allow_chance: bool = False,
) -> PruneSummary | None:
    """Prune with ``criterion`` (None: the lab's, ``rank_layer``'s mean activation ranking
    ``layer``'s channels) and write everything to ``out`` atomically; return the summary.

    ``thresholds`` (accuracy drops in points; default 2, 4, 10 for the lab's criterion, none for
    the others, which save their own choice). The criterion sees only ``clean_valid``;
    ``poisoned_valid`` only gives the ASR. The sweep runs in IEEE fp32 unless ``tf32``;
    ``summary.json`` records the precision. With the lab's criterion and ``trainer_options``
    (``devices`` > 1, ``strategy="ddp"``...) ranking and sweep run data-parallel under Lightning
    with the same result (:func:`bdpruning.lightning_modules.sweep.distributed_sweep`). Returns
    None in the extra processes of a ``ddp`` launch. ``max_accuracy_drop`` (points) caps a
    criterion's choice (:mod:`bdpruning.sweep.budget`); the summary shows both. A baseline at
    chance level (the model and the data do not fit) stops the run before anything is written
    (:func:`~bdpruning.evaluation.chance.check_not_chance`): on the first clean images before the
    sweep, then on all of them; unless ``allow_chance`` (an untrained model on purpose: a timing
    run, a test of the mechanics)."""
    out = prepare_out_dir(out, force)
    trainer_options = TrainerOptions.of(trainer_options)
    distributed = criterion is None and trainer_options.devices > 1
    model, clean, poisoned = load_inputs(model_path, clean_valid, poisoned_valid, "cpu" if distributed else device,
                                         model_options)
    where = f"{model_path} on {clean_valid}"
    if criterion is not None:
        check_settings(criterion, model)  # a bad setting is named before the data's fit
    if not allow_chance:
        check_first_look(model, clean, where)
    sweep = dict(full_sweep=full_sweep, batch_size=batch_size, tf32=tf32)
    if criterion is not None:
        result = sweep_criterion(model, criterion, clean, poisoned, thresholds=thresholds or (), progress=progress,
                                 max_accuracy_drop=max_accuracy_drop, **sweep)
    elif distributed:
        from ..lightning_modules.sweep import distributed_sweep

        result = distributed_sweep(model, clean, poisoned, layer=layer, rank_layer=rank_layer,
                                   thresholds=thresholds or (2.0, 4.0, 10.0), **sweep,
                                   **trainer_options.trainer_kwargs())
    else:
        result = run_sweep(model, clean, poisoned, layer=layer, rank_layer=rank_layer,
                           thresholds=thresholds or (2.0, 4.0, 10.0), progress=progress, **sweep)
    if result is None:  # an extra ddp process: the first one writes
        return None
    if not allow_chance:
        check_not_chance(round(result.all_steps[0].clean_accuracy * len(clean) / 100), len(clean),
                         model_info(model).num_classes, where=where)
    inputs = RunInputs(str(model_path), str(clean_valid), None if poisoned_valid is None else str(poisoned_valid),
                       str(next(model.parameters()).device))
    return _save(result, model, out, inputs, force)


def _save(result: SweepResult | DefenseResult, model: nn.Module, out: Path, inputs: RunInputs | None,
          force: bool) -> PruneSummary:
    """Write a sweep's results, its repaired models (from the unpruned ``model`` it ran on) and
    plots into ``out`` atomically."""
    from .. import plots

    out = prepare_out_dir(out, force)
    model_info(model)  # refuse an unrecorded model before anything is written
    model = model.eval()
    lab = isinstance(result, SweepResult)
    with atomic_dir(out) as directory:
        if lab:
            summary = write_sweep_results(result, directory, inputs)
            save_repaired_models(model, result, directory)
            layer, marks = result.layer, ()
        else:
            summary = write_defense_results(result, directory, inputs)
            save_defense_models(model, result, directory)
            scores = result.scores
            layer, marks = "all covered conv layers", [(scores.criterion, scores.selected / max(len(scores.order), 1))]
        steps = result.steps
        plots.plot_sweep(
            [s.fraction_pruned for s in steps], [s.clean_accuracy for s in steps],
            None if result.poisoned_samples is None else [s.attack_success_rate for s in steps],
            [(h.threshold, h.fraction_pruned) for h in result.thresholds], directory / "accuracy_asr.png",
            layer=layer, marks=marks,
        )
        if lab:
            plots.plot_activations(result.ranking.order, result.ranking.mean_activation,
                                   directory / "activations.png", layer=result.rank_layer)
        else:
            plots.plot_scores(scores.order, scores.scores, directory / "scores.png",
                              f"{scores.criterion}: {scores.score_name}", scores.selected)
    log.info("%s results written to %s", "pruning" if lab else result.scores.criterion, out)
    return summary


def save_repaired(result: SweepResult, model: nn.Module, out_dir: str | os.PathLike[str], *,
                  force: bool = False) -> dict[float, Path]:
    """Save the repaired model B'_T of every threshold ``result`` reached, from the unpruned
    ``model`` it was swept on, into ``out_dir/repaired_<T>pct`` (written atomically; each a model
    directory that :func:`bdpruning.load_model` reloads). Returns ``{threshold: directory}``.

    Raises :class:`~bdpruning.BdpruningError` when ``out_dir`` exists (unless ``force``) or the
    model has no bdpruning record (see :func:`bdpruning.adopt`).
    """
    out = prepare_out_dir(out_dir, force)
    model_info(model)  # refuse an unrecorded model before anything is written
    with atomic_dir(out) as directory:
        save_repaired_models(model, result, directory)
    return {hit.threshold: out / threshold_dirname(hit.threshold) for hit in result.thresholds if hit.reached}


def save_defense(result: DefenseResult, model: nn.Module, out: str | os.PathLike[str], *,
                 force: bool = False) -> dict:
    """Write a criterion's results, repaired models (from the unpruned ``model`` it ran on) and
    plots into ``out`` atomically (see the module docstring); return the summary as JSON-ready data.

    Raises :class:`~bdpruning.BdpruningError` when ``out`` exists (unless ``force``) or the
    model has no bdpruning record (see :func:`bdpruning.adopt`)."""
    return _save(result, model, Path(out), None, force).to_dict()


#: Old names, kept for one release: both are the one prune stage.
prune_model = prune_stage
defend_model = prune_stage
