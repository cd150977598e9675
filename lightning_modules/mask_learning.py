"""What the training-based criteria (ANP, RNP) share under Lightning: the defender's clean
images (a seeded subset) and the Trainer. Poisoned data never reaches them."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Subset

from bdpruning.data.forms import DataLike, as_image_data, model_expectations
from bdpruning.errors import BdpruningError

from .data import H5DataModule

__all__ = ["clean_training_data", "lightning_settings"]


def clean_training_data(model: nn.Module, clean: DataLike, images: int | None, batch_size: int, seed: int,
                        num_workers: int = 0) -> H5DataModule:
    """A DataModule whose training set is ``images`` clean images drawn with ``seed`` (all when
    None or when the set is smaller), shuffled every epoch with ``seed``."""
    if images is not None and images < 1:
        raise BdpruningError(f"need at least 1 clean image to learn masks (got {images})")
    if batch_size < 1:
        raise BdpruningError(f"batch size must be at least 1 (got {batch_size})")
    dataset = as_image_data(clean, **model_expectations(model)).as_dataset()
    if images is not None and images < len(dataset):
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:images]
        dataset = Subset(dataset, sorted(chosen.tolist()))
    return H5DataModule(clean_train=dataset, batch_size=batch_size, num_workers=num_workers, seed=seed)


def lightning_settings(trainer_options: dict) -> dict:
    """Where the training ran, for the criterion's record."""
    return {"accelerator": trainer_options.get("accelerator", "auto"), "devices": trainer_options.get("devices", 1),
            "strategy": trainer_options.get("strategy", "auto")}
