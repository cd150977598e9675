"""RNP, Reconstructive Neuron Pruning (Li et al., ICML 2023), as its authors' code runs it
(bboylyg/RNP, ``main.py``).

Unlearn, then recover. Unlearning (``train_step_unlearning``, lines 27-47; optimizer and
schedule lines 203-204): SGD (lr 0.01, momentum 0.9, weight decay 5e-4, the lr divided by 10
at epochs 10 and 20) ascends the clean loss, in training mode, and stops after the first
*epoch* whose running training accuracy is at most ``stop_accuracy`` (0.2; lines 208-233).
The authors' ``clip_grad_norm_`` runs before ``backward`` (lines 41-42), so it clips nothing:
``clip_norm`` is None by default. Recovering (``train_step_recovering``, lines 49-72;
optimizer line 253): per-channel masks on the unlearned model's BatchNorms, learned by SGD (lr
0.2, momentum 0.9) on ``alpha * clean loss`` (alpha 0.2, lines 61 and 342), clipped to [0, 1],
20 epochs. Channels whose mask falls below ``threshold`` (0.2) are pruned in the *original*
model by zeroing only the BatchNorm's weight (``pruning``, lines 116-120): the scores carry
``keep_shift``. Masks sit on the BatchNorm after a conv, else on the conv channel (ours: the
authors' nets all have BatchNorm)::

    scores = RNP().score(model, "clean_valid.h5")      # Lightning, CPU/GPU/DDP
    scores.selection()

Our options beyond the authors (off by default): ``stop_per_batch`` stops unlearning at the
first batch whose running accuracy reaches ``stop_accuracy``; a smaller ``unlearn_lr`` suits a
model that reads raw 0..255 pixels (the authors' nets read normalised images, so the same lr
moves a first layer's output up to 255 times further; bdpruning's records do not say which a
model reads, so this is the user's choice). An unlearning
that ends at chance warns: the masks recovered from a model at chance tend to switch off
almost every channel.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..data.forms import DataLike
from ..errors import BdpruningError
from ..pruning.finetuning import finetune_loss, log_probabilities
from .base import ChannelScores
from .channel_masks import ChannelMasks
from .trained import TrainedCriterion

__all__ = ["RNP", "recovery_loss", "unlearning_loss", "unlearning_optimizer"]

log = logging.getLogger(__name__)

#: The authors' unlearning schedule (``--schedule``, line 325): lr x 0.1 at these epochs.
SCHEDULE = (10, 20)


def unlearning_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The negated clean loss (gradient ascent), and the predicted labels."""
    log_probs = log_probabilities(model, images)
    return -torch.nn.functional.nll_loss(log_probs, labels), log_probs.argmax(dim=1).detach()


def recovery_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                  alpha: float) -> tuple[torch.Tensor, None]:
    """``alpha`` times the clean loss (``main.py`` line 61)."""
    return alpha * finetune_loss(model, images, labels), None


def unlearning_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> dict:
    """SGD with momentum 0.9 and ``weight_decay``, lr x 0.1 at the epochs of :data:`SCHEDULE`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(SCHEDULE), gamma=0.1)
    return {"optimizer": optimizer, "lr_scheduler": scheduler}


@dataclass
class RNP(TrainedCriterion):
    """The RNP criterion (defaults: the authors' CIFAR settings, ``main.py`` lines 342-347).
    The shared settings (images, threshold, count, keep_shift, ...) are
    :class:`~.trained.TrainedCriterion`'s; ``stop_per_batch`` is ours."""

    stop_accuracy: float = 0.2
    unlearn_lr: float = 0.01
    unlearn_epochs: int = 20
    weight_decay: float = 5e-4
    clip_norm: float | None = None
    alpha: float = 0.2
    recover_lr: float = 0.2
    recover_epochs: int = 20
    stop_per_batch: bool = False
    name: str = "rnp"
    overflow_hint: ClassVar[str] = ("RNP's unlearning drove the model far past chance: try stop_per_batch "
                                    "(--rnp-stop-per-batch), which stops it at the first batch at the stop accuracy")

    def check(self) -> None:
        """Refuse settings that cannot run."""
        if not 0 <= self.stop_accuracy < 1:
            raise BdpruningError(f"the unlearning stop accuracy must lie in [0, 1) (got {self.stop_accuracy})")
        if self.unlearn_epochs < 1 or self.recover_epochs < 1:
            raise BdpruningError("unlearning and recovering need at least 1 epoch each")
        if not 0 < self.alpha <= 1:
            raise BdpruningError(f"alpha must lie in (0, 1] (got {self.alpha})")

    def settings(self) -> dict:
        return {"stop_accuracy": self.stop_accuracy, "unlearn_lr": self.unlearn_lr,
                "unlearn_epochs": self.unlearn_epochs, "weight_decay": self.weight_decay,
                "clip_norm": self.clip_norm, "alpha": self.alpha, "recover_lr": self.recover_lr,
                "recover_epochs": self.recover_epochs, "stop_per_batch": self.stop_per_batch}

    def score(self, model: nn.Module, clean: DataLike | None = None) -> ChannelScores | None:
        """Unlearn a copy of ``model`` on ``clean`` (required), learn masks on it; ``model`` is
        unchanged. Returns None in the extra processes of the ``ddp`` launcher."""
        from ..lightning_modules.rnp import RecoverModule, UnlearnModule

        self.check()
        start = time.perf_counter()
        data = self.training_data(model, clean)
        unlearned = copy.deepcopy(model).train().requires_grad_(True)
        unlearn = UnlearnModule(unlearned, unlearning_loss,
                                functools.partial(unlearning_optimizer, lr=self.unlearn_lr,
                                                  weight_decay=self.weight_decay),
                                self.stop_accuracy, self.unlearn_epochs, self.stop_per_batch)
        clip = {} if self.clip_norm is None else {"gradient_clip_val": self.clip_norm}
        self.fit(unlearn, data, "RNP unlearning", "epoch", self.unlearn_epochs, per="epoch",
                 max_epochs=self.unlearn_epochs, **clip)
        accuracy = unlearn.epoch_accuracy
        self._check_unlearning(accuracy, model)
        unlearned.requires_grad_(False)
        masks = ChannelMasks(unlearned, self.layers)
        recover = RecoverModule(unlearned, masks, functools.partial(recovery_loss, alpha=self.alpha), self.recover_lr)
        if not self.fit(recover, data, "RNP recovering", "epoch", self.recover_epochs, per="epoch",
                        max_epochs=self.recover_epochs):
            return None  # an extra process of the ddp launcher: the first one reports
        values = masks.values()
        masks.remove()
        seconds = time.perf_counter() - start
        log.info("RNP: unlearned in %d epochs, %.1f s in all", len(accuracy), seconds)
        return self.scores(values, {**self.settings(), "unlearn_epochs_run": len(accuracy),
                                    "unlearn_accuracy": [100 * a for a in accuracy]}, clean, data, seconds)

    def _check_unlearning(self, accuracy: list[float], model: nn.Module) -> None:
        """Warn when unlearning did not reach the stop accuracy, or ended at chance."""
        if not accuracy:
            return
        classes = getattr(getattr(model, "bdpruning_info", None), "num_classes", None)
        if accuracy[-1] > self.stop_accuracy:
            log.warning("RNP: clean accuracy only fell to %.1f %% in %d unlearning epochs",
                        100 * accuracy[-1], self.unlearn_epochs)
        elif classes and accuracy[-1] <= 1.5 / classes:
            log.warning("RNP: unlearning ended at chance (clean accuracy %.1f %%, %d classes): the recovered masks "
                        "may switch off most channels; try stop_per_batch or a smaller unlearning rate",
                        100 * accuracy[-1], classes)
