"""RNP, Reconstructive Neuron Pruning (Li et al., ICML 2023).

Unlearn, then recover: gradient ascent on the clean loss until the clean accuracy falls to
``stop_accuracy`` (20 %) exposes the backdoor (the unlearned model leans on its backdoor
channels); per-channel masks learned on the unlearned model by minimising the clean loss then
switch those channels off. The filters with low masks (below ``threshold``, 0.2) are pruned in
the *original* model. Masks sit on the BatchNorm after a conv, else on the conv channel::

    scores = RNP().score(model, "clean_valid.h5")      # Lightning, CPU/GPU/DDP
    scores.selection()

The loops are :class:`bdpruning.lightning_modules.rnp.UnlearnModule` and ``RecoverModule``.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

from torch import nn

from ..data.forms import DataLike
from ..errors import BdpruningError
from .base import ChannelScores
from .channel_masks import ChannelMasks
from .trained import TrainedCriterion

__all__ = ["RNP"]

log = logging.getLogger(__name__)


@dataclass
class RNP(TrainedCriterion):
    """The RNP criterion (defaults: the authors' CIFAR settings). The shared settings (images,
    threshold, count, ...) are :class:`~.trained.TrainedCriterion`'s."""

    stop_accuracy: float = 0.2
    unlearn_lr: float = 0.01
    unlearn_epochs: int = 20
    weight_decay: float = 5e-4
    clip_norm: float = 20.0
    recover_lr: float = 0.2
    recover_epochs: int = 20
    name: str = "rnp"

    def check(self) -> None:
        """Refuse settings that cannot run."""
        if not 0 <= self.stop_accuracy < 1:
            raise BdpruningError(f"the unlearning stop accuracy must lie in [0, 1) (got {self.stop_accuracy})")
        if self.unlearn_epochs < 1 or self.recover_epochs < 1:
            raise BdpruningError("unlearning and recovering need at least 1 epoch each")

    def settings(self) -> dict:
        return {"stop_accuracy": self.stop_accuracy, "unlearn_lr": self.unlearn_lr,
                "unlearn_epochs": self.unlearn_epochs, "weight_decay": self.weight_decay,
                "clip_norm": self.clip_norm, "recover_lr": self.recover_lr, "recover_epochs": self.recover_epochs}

    def score(self, model: nn.Module, clean: DataLike | None = None) -> ChannelScores | None:
        """Unlearn a copy of ``model`` on ``clean`` (required), learn masks on it; ``model`` is
        unchanged. Returns None in the extra processes of the ``ddp`` launcher."""
        from ..lightning_modules.evaluation import make_trainer
        from ..lightning_modules.rnp import RecoverModule, UnlearnModule

        self.check()
        start = time.perf_counter()
        data = self.training_data(model, clean)
        unlearned = copy.deepcopy(model).train().requires_grad_(True)
        unlearn = UnlearnModule(unlearned, self.unlearn_lr, self.weight_decay, self.stop_accuracy, self.unlearn_epochs)
        trainer = make_trainer(max_epochs=self.unlearn_epochs, gradient_clip_val=self.clip_norm,
                               **self.trainer_options)
        data.check_processes(trainer.world_size)
        trainer.fit(unlearn, datamodule=data)
        if unlearn.epoch_accuracy and unlearn.epoch_accuracy[-1] > self.stop_accuracy:
            log.warning("RNP: clean accuracy only fell to %.1f %% in %d unlearning epochs",
                        100 * unlearn.epoch_accuracy[-1], self.unlearn_epochs)
        unlearned.requires_grad_(False)
        masks = ChannelMasks(unlearned, self.layers)
        trainer = make_trainer(max_epochs=self.recover_epochs, **self.trainer_options)
        trainer.fit(RecoverModule(unlearned, masks, self.recover_lr), datamodule=data)
        if not trainer.is_global_zero:  # an extra process of the ddp launcher: the first one reports
            return None
        values = masks.values()
        masks.remove()
        seconds = time.perf_counter() - start
        log.info("RNP: unlearned in %d epochs, %.1f s in all", len(unlearn.epoch_accuracy), seconds)
        return self.scores(values, {**self.settings(), "unlearn_epochs_run": len(unlearn.epoch_accuracy),
                                    "unlearn_accuracy": [100 * a for a in unlearn.epoch_accuracy]},
                           clean, data, seconds)
