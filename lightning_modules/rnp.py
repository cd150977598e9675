"""RNP's two stages as thin LightningModules: unlearning (gradient ascent on the clean loss
until clean accuracy falls to a threshold) and recovering (masks on the unlearned model).

The science is in :mod:`bdpruning.criteria.rnp`; these modules only wire it to a Trainer.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

from bdpruning.criteria.channel_masks import ChannelMasks
from bdpruning.pruning.finetuning import finetune_loss, log_probabilities

__all__ = ["UnlearnModule", "RecoverModule"]


class UnlearnModule(pl.LightningModule):
    """Gradient ascent on the clean loss (SGD with momentum 0.9 and weight decay); stops after
    the first epoch whose running clean accuracy is at most ``stop_accuracy`` (a fraction)."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, stop_accuracy: float, epochs: int) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.stop_accuracy = lr, weight_decay, stop_accuracy
        self.accuracy = MeanMetric()
        # per epoch (NaN: not run); a buffer, so it travels back from ddp_spawn with the state dict
        self.register_buffer("accuracy_history", torch.full((epochs,), float("nan"), dtype=torch.float64))

    @property
    def epoch_accuracy(self) -> list[float]:
        """Clean accuracy (a fraction, over every process) of each unlearning epoch run."""
        return [a for a in self.accuracy_history.tolist() if a == a]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        log_probs = log_probabilities(self.model, images)
        self.accuracy.update((log_probs.argmax(dim=1) == labels).double().mean(), weight=len(labels))
        return -torch.nn.functional.nll_loss(log_probs, labels)

    def on_train_epoch_end(self) -> None:
        accuracy = float(self.accuracy.compute())  # over every process
        self.accuracy.reset()
        self.accuracy_history[self.current_epoch] = accuracy
        if accuracy <= self.stop_accuracy:
            self.trainer.should_stop = True

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)


class RecoverModule(pl.LightningModule):
    """Learns ``masks`` on the frozen unlearned ``model`` by minimising the clean loss."""

    def __init__(self, model: nn.Module, masks: ChannelMasks, lr: float) -> None:
        super().__init__()
        self.model, self.masks, self.lr = model, masks, lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return finetune_loss(self.model, images, labels)

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        self.masks.clip_masks()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.masks.mask_parameters(), lr=self.lr, momentum=0.9)
