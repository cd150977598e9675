"""ANP, Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021), as its authors' code runs it
(csdongxian/ANP_backdoor, ``optimize_mask_cifar.py`` and ``prune_neuron_cifar.py``).

A mask ``m`` in [0, 1] per conv channel is learned on clean data while the channels are
perturbed adversarially and multiplicatively: weight x (m + delta), bias x (1 + xi). Per batch
(``mask_train``, lines 172-214): ``delta`` and ``xi`` start uniform in [-eps, eps]
(``models/anp_batchnorm.py`` ``reset``, lines 26-29), then take ``steps`` steps of size
``eps / steps`` along the *sign* of the gradient of the negated clean loss (``sign_grad`` then
``noise_opt.step()``, lines 185-193; optimizer at line 99); the authors do not clip the noise
afterwards (so it can reach 2 eps; ``clip_noise=True`` is our option that keeps it within eps).
Then one SGD step (lr 0.2, momentum 0.9, line 97) on ``alpha * natural loss + (1 - alpha) *
perturbed loss`` (lines 196-213), masks clipped to [0, 1] (``clip_mask``). The model is in
training mode throughout (line 173: BatchNorm uses batch statistics).

The perturbed weights are the BatchNorm's after a conv (``NoisyBatchNorm2d``), else the conv
channel's own (the authors' answer for nets without BatchNorm, their issue #2). Pruning zeroes
only the BatchNorm's weight and keeps its shift (``prune_neuron_cifar.py`` ``pruning``, lines
108-112): the scores carry ``keep_shift``::

    scores = ANP(iterations=2000).score(model, "clean_valid.h5")   # Lightning, CPU/GPU/DDP
    scores.selection()                                               # {"conv_2": [5], ...}

One iteration is :func:`anp_iteration`; Lightning only calls it
(:class:`bdpruning.lightning_modules.mask_learning.MaskStepModule`).
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
from torch import nn

from ..data.forms import DataLike
from ..errors import BdpruningError
from ..pruning.finetuning import finetune_loss
from .base import ChannelScores
from .channel_masks import ChannelMasks
from .trained import TrainedCriterion

__all__ = ["ANP", "anp_iteration", "anp_mask_loss", "anp_optimizers", "perturb_adversarially"]

log = logging.getLogger(__name__)


def perturb_adversarially(model: nn.Module, masks: ChannelMasks, images: torch.Tensor, labels: torch.Tensor,
                          eps: float, steps: int, optimizer: torch.optim.Optimizer,
                          generator: torch.Generator | None,
                          backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                          clip_noise: bool = False) -> None:
    """Start the perturbations uniformly in [-eps, eps], then take ``steps`` signed ascent
    steps on the clean loss (``optimizer``: SGD over the perturbations, lr ``eps / steps``):
    the gradient is replaced by its sign before the step, as the authors' ``sign_grad``
    (``optimize_mask_cifar.py`` lines 142-145, 192). ``clip_noise`` (ours; the authors do not)
    clips each step back to [-eps, eps]."""
    masks.reset_noise(eps, generator)
    masks.perturbed = True
    for _ in range(steps):
        optimizer.zero_grad()
        backward(-finetune_loss(model, images, labels))
        masks.sign_noise_gradients()
        optimizer.step()
        if clip_noise:
            masks.clip_noise(eps)


def anp_mask_loss(model: nn.Module, masks: ChannelMasks, images: torch.Tensor, labels: torch.Tensor,
                  alpha: float, perturbed: bool = True) -> torch.Tensor:
    """``alpha * natural loss + (1 - alpha) * loss under the perturbations`` (natural only
    when not ``perturbed``); leaves the masks unperturbed (lines 196-207)."""
    robust = 0.0
    if perturbed:
        masks.perturbed = True
        robust = finetune_loss(model, images, labels)
    masks.perturbed = False
    natural = finetune_loss(model, images, labels)
    return alpha * natural + (1 - alpha) * robust if perturbed else natural


def anp_iteration(model: nn.Module, masks: ChannelMasks, images: torch.Tensor, labels: torch.Tensor,
                  optimizers: Sequence[torch.optim.Optimizer], backward: Callable[[torch.Tensor], None],
                  generator: torch.Generator | None, *, eps: float, alpha: float, steps: int,
                  clip_noise: bool = False) -> None:
    """One ANP iteration on a batch: the perturbations (when ``eps`` > 0), then one mask step,
    masks clipped to [0, 1]. ``optimizers``: from :func:`anp_optimizers`."""
    if eps > 0:
        perturb_adversarially(model, masks, images, labels, eps, steps, optimizers[1], generator, backward,
                              clip_noise)
    optimizers[0].zero_grad()
    backward(anp_mask_loss(model, masks, images, labels, alpha, perturbed=eps > 0))
    optimizers[0].step()
    masks.clip_masks()


def anp_optimizers(masks: ChannelMasks, *, eps: float, steps: int, mask_lr: float) -> list[torch.optim.Optimizer]:
    """The authors' optimizers (lines 96-99): SGD with momentum 0.9 over the masks; plain SGD
    with lr ``eps / steps`` over the perturbations (none when ``eps`` is 0)."""
    mask_optimizer = torch.optim.SGD(masks.mask_parameters(), lr=mask_lr, momentum=0.9)
    if eps <= 0:
        return [mask_optimizer]
    return [mask_optimizer, torch.optim.SGD(masks.noise_parameters(), lr=eps / steps)]


@dataclass
class ANP(TrainedCriterion):
    """The ANP criterion (defaults: the authors', ``optimize_mask_cifar.py`` lines 21-37: eps
    0.4, one step, alpha 0.2, 2000 iterations of batch 128, mask lr 0.2, 500 images per the
    README; fewer ``iterations`` for a quick run). ``clip_noise`` is ours (off: the authors').
    The shared settings (images, threshold, count, keep_shift, ...) are :class:`~.trained.TrainedCriterion`'s."""

    eps: float = 0.4
    alpha: float = 0.2
    iterations: int = 2000
    steps: int = 1
    mask_lr: float = 0.2
    clip_noise: bool = False
    name: str = "anp"
    overflow_hint: ClassVar[str] = "try a smaller perturbation (--eps) or mask step (--alpha)"

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
                "mask_lr": self.mask_lr, "clip_noise": self.clip_noise}

    def score(self, model: nn.Module, clean: DataLike | None = None) -> ChannelScores | None:
        """Learn the masks on a copy of ``model`` from ``clean`` (required); ``model`` is unchanged.
        Returns None in the extra processes of the ``ddp`` launcher."""
        from ..lightning_modules.mask_learning import MaskStepModule

        self.check()
        start = time.perf_counter()
        data = self.training_data(model, clean)
        work = copy.deepcopy(model).train().requires_grad_(False)
        masks = ChannelMasks(work, self.layers, noise=True)
        step = functools.partial(anp_iteration, eps=self.eps, alpha=self.alpha, steps=self.steps,
                                 clip_noise=self.clip_noise)
        optimizers = functools.partial(anp_optimizers, eps=self.eps, steps=self.steps, mask_lr=self.mask_lr)
        module = MaskStepModule(work, masks, step, optimizers, self.iterations, self.seed)
        if not self.fit(module, data, f"ANP ({self.iterations} iterations)", "iteration", self.iterations,
                        per="batch", max_epochs=-1):
            return None  # an extra process of the ddp launcher: the first one reports
        values = masks.values()
        masks.remove()
        seconds = time.perf_counter() - start
        iterations = int(module.iterations_run)
        log.info("ANP: %d iterations in %.1f s", iterations, seconds)
        return self.scores(values, {**self.settings(), "iterations_run": iterations}, clean, data, seconds)
