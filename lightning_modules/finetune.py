"""Fine-pruning with Lightning: fine-tune a repaired model on clean data, evaluating every epoch.

The module is thin: the loss, the optimizer and the pruned-channel masks come from
:mod:`bdpruning.pruning.finetuning`, the counts from :class:`~.evaluation.EvaluationModule` (exact under
DDP). Clean accuracy and ASR are measured before training (Lightning's sanity check, run over
every evaluation batch) and after every epoch; they are kept in buffers of the module, so the
history travels with the state dict that ``ddp_spawn`` copies back to the main process::

    result = finetune_model(model, "clean_valid.h5", epochs=5, poisoned_eval="poisoned_valid.h5")
    result.before, result.after      # rows: epoch, train_loss, clean_accuracy, attack_success_rate, counts
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn
from torch.utils.data import Dataset
from torchmetrics import MeanMetric, Metric

from bdpruning.pruning.finetuning import (
    FinetuneResult, check_finetune_settings, finetune_loss, history_rows, keep_pruned_at_zero, make_optimizer,
)
from bdpruning.data.forms import data_name
from bdpruning.models.outputs import check_output_contract
from bdpruning.pruning.masks import refresh_masked_weights
from bdpruning.evaluation.metrics import EVALUATION_COUNTS
from bdpruning.numerics.precision import precision_record
from bdpruning.runtime.trainer_options import TrainerOptions

from .data import DataLike, ImageDataModule
from .evaluation import EvaluationModule, make_trainer

__all__ = ["FinetuneModule", "finetune_model"]

log = logging.getLogger(__name__)


class FinetuneModule(EvaluationModule):
    """Trains ``model`` on clean batches; records the evaluation counts and train loss per epoch.

    ``history_counts[e]`` (int64, columns :data:`~bdpruning.evaluation.metrics.EVALUATION_COUNTS`) and
    ``history_loss[e]`` hold epoch ``e``; row 0 is before training (its loss is NaN). Training
    runs in the process's float32 precision, recorded in ``training_precision`` when it starts;
    the evaluation in IEEE fp32 unless ``tf32``.
    """

    def __init__(self, model: nn.Module, epochs: int, optimizer: str, lr: float, tf32: bool = False) -> None:
        super().__init__(model, tf32)
        self.training_precision: dict | None = None
        self.optimizer_name, self.lr = optimizer, lr
        self.train_loss = MeanMetric()
        self.register_buffer("history_counts", torch.zeros(epochs + 1, len(EVALUATION_COUNTS), dtype=torch.int64))
        self.register_buffer("history_loss", torch.full((epochs + 1,), math.nan, dtype=torch.float64))

    def setup(self, stage: str) -> None:
        # ddp_spawn on CPU: Lightning gives each process its own parameters and buffers, but the
        # torchmetrics states stay in memory shared by all processes; reset gives fresh ones
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()

    def on_train_start(self) -> None:
        self.training_precision = precision_record()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = finetune_loss(self.model, images, labels)
        self.train_loss.update(loss.detach(), weight=len(labels))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.model.parameters(), self.optimizer_name, self.lr)

    def _row(self) -> int:
        return 0 if self.trainer.sanity_checking else self.current_epoch + 1

    def on_validation_epoch_end(self) -> None:
        row = self._row()
        for column, name in enumerate(EVALUATION_COUNTS):
            count = self.counts[name]
            if count.update_called:  # an absent poisoned set keeps its zeros
                self.history_counts[row, column] = count.compute()  # summed over processes
            count.reset()
        if row == 0:
            self._report(0)

    def on_train_epoch_end(self) -> None:  # runs after the epoch's validation
        row = self._row()
        self.history_loss[row] = self.train_loss.compute().double()
        self.train_loss.reset()
        self._report(row)

    def _report(self, row: int) -> None:
        if self.trainer.is_global_zero:
            entry = history_rows(self.history_counts[row:row + 1].cpu(), self.history_loss[row:row + 1].cpu())[0]
            parts = [f"clean accuracy {entry['clean_accuracy']:.2f} %"]
            if entry["attack_success_rate"] is not None:
                parts.append(f"ASR {entry['attack_success_rate']:.2f} %")
            if entry["train_loss"] is not None:
                parts.append(f"train loss {entry['train_loss']:.4f}")
            log.info("epoch %d%s: %s", row, " (before)" if row == 0 else "", ", ".join(parts))


def _check_first_batch(model: nn.Module, train_set: Dataset, batch_size: int) -> None:
    """The output contract on the first training batch, before any process starts."""
    count = min(batch_size, len(train_set))
    images = torch.stack([train_set[i][0] for i in range(count)])
    parameter = next(model.parameters())
    was_training = model.training
    with torch.no_grad():
        outputs = model.eval()(images.to(device=parameter.device, dtype=parameter.dtype))
    model.train(was_training)
    check_output_contract(model, outputs)


def finetune_model(
    model: nn.Module,
    clean_train: DataLike,
    epochs: int,
    *,
    clean_eval: DataLike | None = None,
    poisoned_eval: DataLike | None = None,
    optimizer: str = "adam",
    lr: float | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    seed: int = 0,
    layer: str | None = None,
    tf32: bool = False,
    **trainer_options,
) -> FinetuneResult | None:
    """Fine-tune the repaired ``model`` in place on ``clean_train``, its pruned channels held at zero.

    Each set is an HDF5 path or another form with random access (see :class:`~.data.ImageDataModule`).

    Clean accuracy and ASR are measured on ``clean_eval`` (default: ``clean_train``) and
    ``poisoned_eval`` before training and after every epoch. A model keeps its pruning masks;
    a mask-less one gets masks on the all-zero channels of ``layer`` first (default: DeepID's
    ``conv_3``; see :func:`bdpruning.pruning.finetuning.keep_pruned_at_zero`). The loss follows the
    model's output contract, checked on the first batch (:func:`~bdpruning.models.outputs.check_output_contract`).
    The data order is the only randomness and ``seed`` fixes it: on CPU the same seed gives the
    same weights. Training keeps torch's float32 precision (on CUDA cuDNN may use TF32); the
    evaluation runs in IEEE fp32 unless ``tf32``; ``settings["precision"]`` records both (with
    ``ddp_spawn`` the training record is the launching process's). ``batch_size`` is per
    process under DDP. Returns None in the extra processes of the ``ddp`` launcher;
    ``trainer_options`` (accelerator, devices, strategy: ``ddp`` or ``ddp_spawn``, progress) go
    to :func:`~.evaluation.make_trainer`.
    """
    lr = check_finetune_settings(epochs, lr, batch_size, optimizer)
    clean_eval = clean_train if clean_eval is None else clean_eval
    data = ImageDataModule.for_model(model, clean_train=clean_train, clean_valid=clean_eval, poisoned_valid=poisoned_eval,
                                  batch_size=batch_size, num_workers=num_workers, seed=seed)
    pruned = keep_pruned_at_zero(model, layer)
    refresh_masked_weights(model)  # a leaf without autograd history: ddp_spawn must pickle it
    _check_first_batch(model, data.train_set, batch_size)
    # load_model gives eval mode; Lightning keeps it
    module = FinetuneModule(model.train(), epochs, optimizer, lr, tf32)
    # num_sanity_val_steps=-1: the whole evaluation runs before the first epoch (the "before" row)
    trainer = make_trainer(max_epochs=epochs, num_sanity_val_steps=-1, **trainer_options)
    data.check_processes(trainer.world_size)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    if not trainer.is_global_zero:
        return None
    refresh_masked_weights(model.cpu())
    settings = {"epochs": epochs, "optimizer": optimizer, "lr": lr, "batch_size": batch_size, "seed": seed,
                "layer": next(iter(pruned)) if len(pruned) == 1 else sorted(pruned),  # as fine-tuned, not as asked
                **_where_trained(trainer_options),
                "precision": {"training": module.training_precision or precision_record(),
                              "evaluation": precision_record(tf32)}}
    sets = {"train": data_name(clean_train),
            "clean_eval": data_name(clean_eval),
            "poisoned_eval": None if poisoned_eval is None else data_name(poisoned_eval)}
    history = history_rows(module.history_counts.cpu(), module.history_loss.cpu())
    return FinetuneResult(model.eval(), pruned, history, settings, sets, seconds)


def _where_trained(trainer_options: dict) -> dict:
    """The record of :class:`~bdpruning.runtime.trainer_options.TrainerOptions` from ``make_trainer``'s arguments."""
    where = ("accelerator", "devices", "strategy")
    return TrainerOptions.of({key: trainer_options[key] for key in where if key in trainer_options}).to_json()
