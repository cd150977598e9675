"""RNP's two stages as thin LightningModules: unlearning (gradient ascent on the clean loss
until clean accuracy falls to a threshold) and recovering (masks on the unlearned model).

The science (losses, the stop rule, optimizers) is in :mod:`bdpruning.criteria.rnp`, handed
in as functions; these modules only wire it to a Trainer and import no criterion.
"""

from __future__ import annotations

from typing import Callable

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

__all__ = ["UnlearnModule", "RecoverModule"]

#: ``loss(model, images, labels) -> (loss, predicted labels or None)``.
Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


class UnlearnModule(pl.LightningModule):
    """Minimises ``loss`` (the negated clean loss) with ``optimizers(model)``; stops after the
    first epoch (or with ``per_batch``, the first batch) whose running clean accuracy is at most
    ``stop_accuracy`` (a fraction)."""

    def __init__(self, model: nn.Module, loss: Loss, optimizers: Callable, stop_accuracy: float, epochs: int,
                 per_batch: bool = False) -> None:
        super().__init__()
        self.model, self.loss, self.make_optimizers = model, loss, optimizers
        self.stop_accuracy, self.per_batch = stop_accuracy, per_batch
        self.accuracy = MeanMetric()
        # per epoch (NaN: not run); a buffer, so it travels back from ddp_spawn with the state dict
        self.register_buffer("accuracy_history", torch.full((epochs,), float("nan"), dtype=torch.float64))

    @property
    def epoch_accuracy(self) -> list[float]:
        """Clean accuracy (a fraction, over every process) of each unlearning epoch run."""
        return [a for a in self.accuracy_history.tolist() if a == a]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss, predicted = self.loss(self.model, images, labels)
        self.accuracy.update((predicted == labels).double().mean(), weight=len(labels))
        if self.per_batch:
            accuracy = float(self.accuracy.compute())
            if accuracy <= self.stop_accuracy:
                self.accuracy_history[self.current_epoch] = accuracy
                self.trainer.should_stop = True
        return loss

    def on_train_epoch_end(self) -> None:
        accuracy = float(self.accuracy.compute())  # over every process
        self.accuracy.reset()
        self.accuracy_history[self.current_epoch] = accuracy
        if accuracy <= self.stop_accuracy:
            self.trainer.should_stop = True

    def configure_optimizers(self):
        return self.make_optimizers(self.model)


class RecoverModule(pl.LightningModule):
    """Learns ``masks`` on the frozen unlearned ``model`` by minimising ``loss``, masks
    clipped to [0, 1] after every step."""

    def __init__(self, model: nn.Module, masks: nn.Module, loss: Loss, lr: float) -> None:
        super().__init__()
        self.model, self.masks, self.loss, self.lr = model, masks, loss, lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return self.loss(self.model, images, labels)[0]

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        self.masks.clip_masks()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.masks.mask_parameters(), lr=self.lr, momentum=0.9)
