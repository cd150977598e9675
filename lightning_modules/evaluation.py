"""Evaluating a model with Lightning: clean accuracy and attack success rate, exact under DDP.

The module is thin: per batch it asks :mod:`bdpruning.evaluation.metrics` which counts each image adds
to, and torchmetrics sums those counts across processes. With :class:`~.data.ImageDataModule`
every image is seen once, so the counts equal a single process's, not approximately. Each
evaluation step runs inside :func:`~bdpruning.numerics.precision.precision_context` (IEEE fp32 unless
``tf32``), in whichever process runs it, so every DDP process gets it::

    results = evaluate_model(model, "test.h5", "bd_test.h5")   # counts and rates (percent)
    results = evaluate_model(model, "test.h5", "bd_test.h5", accelerator="cpu", devices=2,
                             strategy="ddp_spawn")             # the same counts, 2 processes
"""

from __future__ import annotations

import tempfile
from typing import Iterable

import pytorch_lightning as pl
import torch
from torch import nn

from bdpruning.runtime.devices import check_devices
from bdpruning.errors import BdpruningError
from bdpruning.evaluation.metrics import EVALUATION_COUNTS, Count, EvaluationResult, evaluation_outcomes
from bdpruning.numerics.precision import precision_context

from .data import SET_NAMES, DataLike, ImageDataModule

__all__ = [
    "CountingModule", "EvaluationModule", "check_devices", "make_trainer", "run_evaluation", "evaluate_model",
]


class CountingModule(pl.LightningModule):
    """Evaluation by counts: subclasses say what each batch adds in :meth:`outcomes`.

    Every evaluation step runs in IEEE fp32 unless ``tf32`` (TF32 allowed on CUDA).
    """

    def __init__(self, count_names: Iterable[str], tf32: bool = False) -> None:
        super().__init__()
        self.counts = nn.ModuleDict({name: Count() for name in count_names})
        self.tf32 = tf32

    def outcomes(self, images: torch.Tensor, labels: torch.Tensor, poisoned: bool) -> dict[str, torch.Tensor]:
        """Per-image flags for each count this batch adds to."""
        raise NotImplementedError

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        with precision_context(self.tf32):
            outcomes = self.outcomes(images, labels, SET_NAMES[dataloader_idx] == "poisoned")
        for name, flags in outcomes.items():
            self.counts[name].update(flags)

    def on_test_epoch_end(self) -> None:
        # Lightning computes (sums over processes) and resets the logged counts; an absent set's stay unlogged
        self.log_dict({name: count for name, count in self.counts.items() if count.update_called})

    validation_step = test_step
    on_validation_epoch_end = on_test_epoch_end


class EvaluationModule(CountingModule):
    """One model's counts on the clean and poisoned sets (see :class:`bdpruning.evaluation.metrics.EvaluationResult`)."""

    def __init__(self, model: nn.Module, tf32: bool = False) -> None:
        super().__init__(EVALUATION_COUNTS, tf32)
        self.model = model

    def outcomes(self, images: torch.Tensor, labels: torch.Tensor, poisoned: bool) -> dict[str, torch.Tensor]:
        return evaluation_outcomes(self.model(images).argmax(dim=1), labels, poisoned)


def make_trainer(
    accelerator: str = "auto", devices: int = 1, strategy: str = "auto", progress: bool = False, **trainer_args
) -> pl.Trainer:
    """A Trainer that writes nothing: no logger, no checkpoints, no summary.

    One process by default; ``devices > 1`` with ``strategy="ddp"`` (scripts: Lightning
    re-runs the command in each process) or ``"ddp_spawn"`` (also from notebooks and tests).
    ``trainer_args`` go to ``pl.Trainer`` (``max_epochs`` for training, say).
    """
    check_devices(accelerator, devices)
    return pl.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy,
        logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=progress, use_distributed_sampler=False,
        default_root_dir=tempfile.gettempdir(), **trainer_args,
    )


def run_evaluation(
    module: CountingModule, datamodule: pl.LightningDataModule, stage: str = "test", **trainer_options
) -> dict[str, int] | None:
    """Run ``trainer.test`` (or ``validate``) and return the counts, summed over all processes.

    Returns None in the extra processes that Lightning's ``ddp`` launcher starts: only the
    main process reports. ``trainer_options`` go to :func:`make_trainer`.
    """
    trainer = make_trainer(**trainer_options)
    if isinstance(datamodule, ImageDataModule):
        datamodule.check_processes(trainer.world_size)  # here, not as a traceback from a spawned process
    run = {"test": trainer.test, "validate": trainer.validate}[stage]
    results = run(module, datamodule=datamodule, verbose=False)
    if not trainer.is_global_zero:
        return None
    return {name: int(value) for result in results for name, value in result.items()}


def evaluate_model(
    model: nn.Module,
    clean: DataLike,
    poisoned: DataLike | None = None,
    batch_size: int = 512,
    num_workers: int = 0,
    tf32: bool = False,
    **trainer_options,
) -> EvaluationResult | None:
    """Counts and rates (percent) of ``model`` on the clean and poisoned test sets, in IEEE fp32
    unless ``tf32`` (see :func:`~bdpruning.numerics.precision.precision_context`).

    The sets are checked against the model's classes and input shape. Returns None in the
    extra processes of the ``ddp`` launcher; ``trainer_options`` go to :func:`make_trainer`.
    """
    data = ImageDataModule.for_model(model, clean_test=clean, poisoned_test=poisoned, batch_size=batch_size,
                                  num_workers=num_workers)
    counts = run_evaluation(EvaluationModule(model, tf32), data, **trainer_options)
    return None if counts is None else EvaluationResult.of(counts)
