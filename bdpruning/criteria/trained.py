"""What the criteria that learn masks under Lightning (ANP, RNP) share: the defender's clean
images, the choice from the learned masks, and the record of where they trained."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..data.forms import DataLike, data_name
from ..errors import BdpruningError
from .base import ChannelScores, conv_layers
from .channel_masks import check_mask_choice, mask_scores

__all__ = ["TrainedCriterion"]


@dataclass
class TrainedCriterion:
    """Shared settings: ``images`` clean images drawn with ``seed`` (all when None), batches of
    ``batch_size``; prune masks below ``threshold`` (or the ``count`` lowest) of ``layers``
    (default: every conv); ``trainer_options`` (accelerator, devices, strategy, progress) go to
    :func:`~bdpruning.lightning_modules.evaluation.make_trainer`."""

    images: int | None = 500
    threshold: float = 0.2
    count: int | None = None
    batch_size: int = 128
    seed: int = 0
    layers: Sequence[str] | None = None
    trainer_options: dict = field(default_factory=dict)
    name: str = "trained"

    def shared_settings(self) -> dict:
        return {"images": self.images, "threshold": self.threshold, "count": self.count,
                "batch_size": self.batch_size, "seed": self.seed, "mode": "train"}

    def training_data(self, model: nn.Module, clean: DataLike | None):
        """Check the shared settings and seed torch; the DataModule of the clean images to learn on."""
        from ..lightning_modules.mask_learning import clean_training_data

        check_mask_choice(self.threshold, self.count)
        channels = sum(model.get_submodule(layer).weight.shape[0] for layer in conv_layers(model, self.layers))
        if self.count is not None and self.count > channels:
            raise BdpruningError(f"cannot prune the {self.count} lowest masks: the layers have {channels} channels")
        if clean is None:
            raise BdpruningError(f"{self.name.upper()} learns its masks on clean data: give a clean set")
        torch.manual_seed(self.seed)
        return clean_training_data(model, clean, self.images, self.batch_size, self.seed)

    def scores(self, values: dict[str, torch.Tensor], settings: dict, clean: DataLike, data,
               seconds: float) -> ChannelScores:
        """The learned masks as :class:`ChannelScores`, with the full record of the run."""
        from ..lightning_modules.mask_learning import lightning_settings

        record = {**settings, **self.shared_settings(), "data": data_name(clean),
                  "training_images": len(data.train_set), **lightning_settings(self.trainer_options)}
        return mask_scores(self.name, values, self.threshold, self.count, record, seconds)
