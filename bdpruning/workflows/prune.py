"""The whole pruning defense as one call: load, sweep, write results, repaired models and plots."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Sequence

from torch import nn

from ..runtime.atomic import atomic_dir, prepare_out_dir
from ..data.hdf5 import H5ImageSet, read_h5_dataset
from ..models.keras_h5 import write_keras_copy
from ..models.loading import load_model
from ..pruning.masks import prune_channels
from ..models.directory import save_model_dir
from ..models import model_info
from .writers import threshold_dirname, write_sweep_results
from ..sweep.lab import SweepResult, run_sweep

__all__ = ["load_inputs", "prune_model", "save_pruned_copy", "save_repaired", "save_repaired_models"]

log = logging.getLogger(__name__)


def save_pruned_copy(model: nn.Module, pruned: dict[str, list[int]], target: Path, extra: dict) -> bool:
    """Save a copy of ``model`` with ``pruned`` (``{layer: channels}``) pruned into the new
    directory ``target``: a model directory, plus ``model.h5`` when the model came from a DeepID
    Keras file (its layout, pruned channels zeroed). Returns whether ``model.h5`` was written."""
    repaired = copy.deepcopy(model)
    for layer, channels in pruned.items():
        prune_channels(repaired, layer, channels)
    target.mkdir()
    save_model_dir(repaired, target, extra=extra)
    return write_keras_copy(repaired, target / "model.h5")


def save_repaired_models(model: nn.Module, result: SweepResult, directory: Path) -> None:
    """Save B'_T for every reached threshold (see :func:`save_pruned_copy`)."""
    keras_copies = []
    for hit in result.thresholds:
        if not hit.reached:
            continue
        keras_copies.append(save_pruned_copy(
            model, {result.layer: result.ranking.order[: hit.step]}, directory / threshold_dirname(hit.threshold),
            {"threshold": hit.threshold, "step": hit.step,
             "clean_accuracy": hit.clean_accuracy, "attack_success_rate": hit.attack_success_rate},
        ))
    if not all(keras_copies):
        log.info("no Keras .h5 written for the repaired models: the source is not a DeepID .h5 file")


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


def load_inputs(model_path: str | os.PathLike[str], clean_valid: str | os.PathLike[str],
                poisoned_valid: str | os.PathLike[str] | None, device: str) -> tuple[nn.Module, H5ImageSet, H5ImageSet | None]:
    """The model and the validation sets, checked against its classes and input shape."""
    model = load_model(model_path, device=device)
    info = model_info(model)
    clean = read_h5_dataset(clean_valid, info.num_classes, info.input_shape)
    poisoned = read_h5_dataset(poisoned_valid, info.num_classes, info.input_shape) if poisoned_valid else None
    return model, clean, poisoned


def prune_model(
    model_path: str | os.PathLike[str],
    clean_valid: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    poisoned_valid: str | os.PathLike[str] | None = None,
    thresholds: Sequence[float] = (2.0, 4.0, 10.0),
    layer: str = "conv_3",
    rank_layer: str = "pool_3",
    full_sweep: bool = False,
    device: str = "auto",
    batch_size: int = 1024,
    force: bool = False,
    progress: bool = True,
    tf32: bool = False,
    trainer_options: dict | None = None,
) -> dict | None:
    """Run the pruning defense and write everything to ``out`` atomically; return the summary.

    The sweep runs in IEEE fp32 unless ``tf32``; ``summary.json`` records the precision. With
    ``trainer_options`` (``devices`` > 1, ``strategy="ddp"``...) ranking and sweep run
    data-parallel under Lightning with the same result
    (:func:`bdpruning.lightning_modules.sweep.distributed_sweep`); the extra processes return None.
    """
    from .. import plots

    distributed = bool(trainer_options) and trainer_options.get("devices", 1) > 1
    if distributed:
        from ..lightning_modules.sweep import distributed_sweep
    out = prepare_out_dir(out, force)
    model, clean, poisoned = load_inputs(model_path, clean_valid, poisoned_valid, "cpu" if distributed else device)
    if distributed:
        result = distributed_sweep(model, clean, poisoned, layer=layer, rank_layer=rank_layer, thresholds=thresholds,
                                   full_sweep=full_sweep, batch_size=batch_size, tf32=tf32, **trainer_options)
        if result is None:  # an extra ddp process: the first one writes
            return None
    else:
        result = run_sweep(model, clean, poisoned, layer=layer, rank_layer=rank_layer, thresholds=thresholds,
                           full_sweep=full_sweep, batch_size=batch_size, progress=progress, tf32=tf32)
    with atomic_dir(out) as directory:
        summary = write_sweep_results(result, directory, extra={
            "model": str(model_path), "clean_valid": str(clean_valid),
            "poisoned_valid": None if poisoned_valid is None else str(poisoned_valid),
            "device": str(next(model.parameters()).device), "precision": result.precision,
        })
        save_repaired_models(model, result, directory)
        steps = result.steps
        plots.plot_sweep(
            [s.fraction_pruned for s in steps], [s.clean_accuracy for s in steps],
            None if poisoned is None else [s.attack_success_rate for s in steps],
            [(h.threshold, h.fraction_pruned) for h in result.thresholds],
            directory / "accuracy_asr.png", layer=result.layer,
        )
        plots.plot_activations(result.ranking.order, result.ranking.mean_activation,
                               directory / "activations.png", layer=result.rank_layer)
    log.info("pruning results written to %s", out)
    return summary
