"""ANP, Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021).

A mask ``m`` in [0, 1] per conv channel is learned on clean data while the channels' weights are
perturbed adversarially and multiplicatively (weight x (m + delta), bias x (1 + xi), ``|delta|,
|xi| <= eps``): backdoor channels are the ones whose perturbation most easily breaks the clean
model, and their masks fall. The perturbed weights are the BatchNorm's after a conv, else the
conv channel's own (the authors' variant for nets without BatchNorm, such as DeepID). Channels
whose mask falls below a threshold (or the N lowest) are pruned::

    scores = ANP(iterations=2000).score(model, "clean_valid.h5")   # Lightning, CPU/GPU/DDP
    scores.selection()                                               # {"conv_2": [5], ...}

The training loop is :class:`bdpruning.lightning_modules.anp.ANPModule`.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..data.forms import DataLike
from ..errors import BdpruningError
from ..pruning.finetuning import finetune_loss
from .base import ChannelScores
from .channel_masks import ChannelMasks
from .trained import TrainedCriterion

__all__ = ["ANP", "anp_mask_loss", "perturb_adversarially"]

log = logging.getLogger(__name__)


def perturb_adversarially(model: nn.Module, masks: ChannelMasks, images: torch.Tensor, labels: torch.Tensor,
                          eps: float, steps: int, optimizer: torch.optim.Optimizer,
                          generator: torch.Generator | None,
                          backward: Callable[[torch.Tensor], None] = torch.Tensor.backward) -> None:
    """Start the perturbations uniformly in [-eps, eps], then take ``steps`` ascent steps on
    the clean loss (``optimizer`` holds the perturbations), each clipped back to [-eps, eps]."""
    masks.reset_noise(eps, generator)
    masks.perturbed = True
    for _ in range(steps):
        optimizer.zero_grad()
        backward(-finetune_loss(model, images, labels))
        optimizer.step()
        masks.clip_noise(eps)


def anp_mask_loss(model: nn.Module, masks: ChannelMasks, images: torch.Tensor, labels: torch.Tensor,
                  alpha: float, perturbed: bool = True) -> torch.Tensor:
    """``alpha * natural loss + (1 - alpha) * loss under the perturbations`` (natural only
    when not ``perturbed``); leaves the masks unperturbed."""
    robust = 0.0
    if perturbed:
        masks.perturbed = True
        robust = finetune_loss(model, images, labels)
    masks.perturbed = False
    natural = finetune_loss(model, images, labels)
    return alpha * natural + (1 - alpha) * robust if perturbed else natural


@dataclass
class ANP(TrainedCriterion):
    """The ANP criterion (defaults: the authors'; fewer ``iterations`` for a quick run). The
    shared settings (images, threshold, count, ...) are :class:`~.trained.TrainedCriterion`'s."""

    eps: float = 0.4
    alpha: float = 0.2
    iterations: int = 2000
    steps: int = 1
    mask_lr: float = 0.2
    name: str = "anp"

    def check(self) -> None:
        """Refuse settings that cannot run."""
        if not 0 <= self.eps < 1:
            raise BdpruningError(f"eps must lie in [0, 1) (got {self.eps})")
        if not 0 <= self.alpha <= 1:
            raise BdpruningError(f"alpha must lie in [0, 1] (got {self.alpha})")
        if self.iterations < 1 or self.steps < 1:
            raise BdpruningError(f"iterations and steps must be at least 1 (got {self.iterations}, {self.steps})")

    def settings(self) -> dict:
        return {"eps": self.eps, "alpha": self.alpha, "iterations": self.iterations, "steps": self.steps,
                "mask_lr": self.mask_lr}

    def score(self, model: nn.Module, clean: DataLike | None = None) -> ChannelScores | None:
        """Learn the masks on a copy of ``model`` from ``clean`` (required); ``model`` is unchanged.
        Returns None in the extra processes of the ``ddp`` launcher."""
        from ..lightning_modules.anp import ANPModule
        from ..lightning_modules.evaluation import make_trainer

        self.check()
        start = time.perf_counter()
        data = self.training_data(model, clean)
        work = copy.deepcopy(model).train().requires_grad_(False)
        masks = ChannelMasks(work, self.layers, noise=True)
        module = ANPModule(work, masks, self.eps, self.alpha, self.steps, self.mask_lr, self.seed)
        per_iteration = 1 + self.steps if self.eps > 0 else 1  # Lightning counts every optimizer step
        trainer = make_trainer(max_steps=self.iterations * per_iteration, max_epochs=-1, **self.trainer_options)
        data.check_processes(trainer.world_size)
        trainer.fit(module, datamodule=data)
        if not trainer.is_global_zero:  # an extra process of the ddp launcher: the first one reports
            return None
        values = masks.values()
        masks.remove()
        seconds = time.perf_counter() - start
        iterations = int(module.iterations_run)
        log.info("ANP: %d iterations in %.1f s", iterations, seconds)
        return self.scores(values, {**self.settings(), "iterations_run": iterations}, clean, data, seconds)
