"""ANP's mask learning as a thin LightningModule (manual optimization: two optimizers per batch).

The science is in :mod:`bdpruning.criteria.anp`; this module wires it to a Trainer, so it runs
on CPU, one GPU or under DDP like fine-tuning.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn

from bdpruning.criteria.anp import anp_mask_loss, perturb_adversarially
from bdpruning.criteria.channel_masks import ChannelMasks

__all__ = ["ANPModule"]


class ANPModule(pl.LightningModule):
    """Learns ``masks`` on the frozen ``model``: per batch, adversarial perturbations first
    (``steps`` ascent steps within ``eps``), then one mask step on
    ``alpha * clean loss + (1 - alpha) * perturbed loss``, masks clipped to [0, 1]."""

    def __init__(self, model: nn.Module, masks: ChannelMasks, eps: float, alpha: float, steps: int,
                 mask_lr: float, seed: int) -> None:
        super().__init__()
        self.model, self.masks = model, masks
        self.eps, self.alpha, self.steps, self.mask_lr, self.seed = eps, alpha, steps, mask_lr, seed
        self.automatic_optimization = False
        self.generator: torch.Generator | None = None
        # a buffer, so that the count travels back from ddp_spawn's processes with the state dict
        self.register_buffer("iterations_run", torch.zeros((), dtype=torch.int64))

    def on_train_start(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + self.global_rank)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        masks = torch.optim.SGD(self.masks.mask_parameters(), lr=self.mask_lr, momentum=0.9)
        if self.eps <= 0:
            return [masks]
        return [masks, torch.optim.SGD(self.masks.noise_parameters(), lr=self.eps / self.steps)]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        if self.eps > 0:
            perturb_adversarially(self.model, self.masks, images, labels, self.eps, self.steps, optimizers[1],
                                  self.generator, self.manual_backward)
        optimizers[0].zero_grad()
        loss = anp_mask_loss(self.model, self.masks, images, labels, self.alpha, perturbed=self.eps > 0)
        self.manual_backward(loss)
        optimizers[0].step()
        self.masks.clip_masks()
        self.iterations_run += 1
