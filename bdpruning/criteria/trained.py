"""What the criteria that learn masks under Lightning (ANP, RNP) share: the defender's clean
images, a quiet Trainer with one progress bar per stage, the choice from the learned masks
(pruned as their authors prune: the scale zeroed, the shift kept) and the record of where
they trained."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
from torch import nn

from ..data.forms import DataLike, data_name
from ..errors import BdpruningError
from ..runtime.trainer_options import TrainerOptions
from .base import ChannelScores, conv_layers
from .channel_masks import check_mask_choice, mask_scores

__all__ = ["TrainedCriterion"]


@dataclass
class TrainedCriterion:
    """Shared settings: ``images`` clean images drawn with ``seed`` (all when None), batches of
    ``batch_size``; prune masks below ``threshold`` (or the ``count`` lowest) of ``layers``
    (default: every conv); ``trainer_options`` (a :class:`~bdpruning.runtime.trainer_options.TrainerOptions`
    or a dict of its fields: accelerator, devices, strategy, progress, verbose) say where Lightning trains.

    ``keep_shift`` (default, the authors'): a pruned channel's scale is zeroed and its shift
    kept, where the masks were learned: the BatchNorm's beta after a conv, else the conv's
    bias (ANP ``prune_neuron_cifar.py`` lines 108-112, RNP ``main.py`` lines 116-120 zero only
    ``<BatchNorm>.weight``). False zeroes the shift too (the channel's output becomes 0)."""

    images: int | None = 500
    threshold: float = 0.2
    count: int | None = None
    batch_size: int = 128
    seed: int = 0
    layers: Sequence[str] | None = None
    trainer_options: TrainerOptions | dict = field(default_factory=TrainerOptions)
    keep_shift: bool = True
    name: str = "trained"
    #: what to try when the masks overflow
    overflow_hint: ClassVar[str] = "try a smaller learning rate"

    def shared_settings(self) -> dict:
        return {"images": self.images, "threshold": self.threshold, "count": self.count,
                "batch_size": self.batch_size, "seed": self.seed, "mode": "train", "keep_shift": self.keep_shift}

    def validate(self) -> None:
        """Refuse settings that cannot run (before any data is read)."""
        getattr(self, "check", lambda: None)()
        check_mask_choice(self.threshold, self.count)

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
        return clean_training_data(model, clean, self.images, self.batch_size, self.seed, self._data_device())

    def _data_device(self) -> str | None:
        """Where the training images can wait for the whole run: the one GPU Lightning will use
        (None: the host; Lightning moves each batch)."""
        options = TrainerOptions.of(self.trainer_options)
        if not options.one_process:
            return None
        accelerator = options.accelerator
        gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        return "cuda" if gpu else None

    def fit(self, module, data, description: str, unit: str, total: int, per: str, **trainer_args) -> bool:
        """``trainer.fit`` quietly, with a progress bar of ``total`` ``unit``s; False in the
        extra processes of a ``ddp`` launch."""
        from ..lightning_modules.evaluation import make_trainer
        from ..lightning_modules.mask_learning import ProgressBar, quiet_lightning

        options = TrainerOptions.of(self.trainer_options)
        progress = sys.stderr.isatty() if options.progress is None else options.progress
        with quiet_lightning(options.verbose):
            trainer = make_trainer(**options.trainer_kwargs(),
                                   callbacks=[ProgressBar(total, description, unit, per, progress)], **trainer_args)
            data.check_processes(trainer.world_size)
            trainer.fit(module, datamodule=data)
        return trainer.is_global_zero

    def scores(self, values: dict[str, torch.Tensor], settings: dict, clean: DataLike, data,
               seconds: float) -> ChannelScores:
        """The learned masks as :class:`ChannelScores`, with the full record of the run; masks
        that are not finite (the training overflowed) are refused, naming the layers."""
        broken = [layer for layer, mask in values.items() if not torch.isfinite(mask).all()]
        if broken:
            raise BdpruningError(
                f"{self.name.upper()}: the learned masks of {', '.join(broken)} are not finite (NaN or inf): the "
                f"training overflowed, so no channel can be chosen from them; {self.overflow_hint}")
        record = {**settings, **self.shared_settings(), "data": data_name(clean),
                  "training_images": len(data.train_set), **TrainerOptions.of(self.trainer_options).to_json()}
        scores = mask_scores(self.name, values, self.threshold, self.count, record, seconds,
                             keep_shift=self.keep_shift)
        scores.trained_on = data.indices
        return scores
