"""What the training-based criteria (ANP, RNP) share under Lightning: the defender's clean
images (a seeded subset, batched straight from one tensor), a quiet Trainer, a progress bar
and a thin module that runs the criterion's own step. Poisoned data never reaches them.

The science (losses, signed steps, clipping) lives in :mod:`bdpruning.criteria`; this module
only calls it, so nothing here imports a criterion.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Callable, Iterator

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from bdpruning.data.forms import DataLike, as_image_data
from bdpruning.models import model_expectations
from bdpruning.errors import BdpruningError

__all__ = ["CleanTrainingData", "MaskStepModule", "ProgressBar", "TensorBatches", "clean_training_data",
           "quiet_lightning"]

#: One training step of a criterion: ``step(model, masks, images, labels, optimizers, backward, generator)``.
Step = Callable[..., None]


class TensorBatches(Dataset):
    """Images and labels held as two tensors, indexed by a list of indices at once: a whole
    batch is one gather (no per-image collation), and on a GPU the tensors stay there."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch (the DataLoader asks for it this way, then applies :meth:`collate_fn`)."""
        index = torch.as_tensor(indices, device=self.labels.device)
        return self.images[index], self.labels[index]

    @staticmethod
    def collate_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch is already gathered."""
        return batch

    def to(self, device: torch.device | str) -> "TensorBatches":
        """The same tensors on ``device`` (once, before training)."""
        return TensorBatches(self.images.to(device), self.labels.to(device))


def clean_training_data(model: nn.Module, clean: DataLike, images: int | None, batch_size: int, seed: int,
                        device: torch.device | str | None = None) -> "CleanTrainingData":
    """A DataModule whose training set is ``images`` clean images drawn with ``seed`` (all when
    None or when the set is smaller), shuffled every epoch with ``seed``; the images are read
    once into a :class:`TensorBatches` (on ``device`` when given: a GPU keeps them there)."""
    if images is not None and images < 1:
        raise BdpruningError(f"need at least 1 clean image to learn masks (got {images})")
    if batch_size < 1:
        raise BdpruningError(f"batch size must be at least 1 (got {batch_size})")
    data = as_image_data(clean, **model_expectations(model))
    chosen = torch.arange(len(data))
    if images is not None and images < len(data):
        chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:images].sort().values
    dataset = data.as_dataset()
    pairs = [dataset[int(i)] for i in chosen]
    dtype = next(model.parameters()).dtype  # a float64 model learns in float64
    tensors = TensorBatches(torch.stack([torch.as_tensor(p[0]) for p in pairs]).to(dtype),
                            torch.as_tensor([int(p[1]) for p in pairs]))
    return CleanTrainingData(tensors if device is None else tensors.to(device), batch_size, seed, chosen.tolist())


class CleanTrainingData(pl.LightningDataModule):
    """The clean training set for ``trainer.fit``, shuffled with a seeded ``DistributedSampler``
    (padded, so every process runs the same number of batches; Lightning calls its
    ``set_epoch``): the same order for a seed in one process or many. ``indices``: where its
    images are in the defender's clean set."""

    def __init__(self, train_set: TensorBatches, batch_size: int, seed: int, indices: list[int]) -> None:
        super().__init__()
        self.train_set, self.batch_size, self.seed, self.indices = train_set, batch_size, seed, indices

    def check_processes(self, world_size: int) -> None:
        """Refuse fewer images than processes (call it before processes are started)."""
        if len(self.train_set) < world_size:
            raise BdpruningError(f"{len(self.train_set)} clean training images for {world_size} processes")

    def train_dataloader(self) -> DataLoader:
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = DistributedSampler(self.train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler,
                          collate_fn=TensorBatches.collate_fn)


@contextlib.contextmanager
def quiet_lightning(verbose: bool = False) -> Iterator[None]:
    """Lightning's banners, tips and warnings off the console (all of them with ``verbose``)."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric",
                                                     "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for module in ("pytorch_lightning", "lightning_fabric", "lightning"):
            warnings.filterwarnings("ignore", module=module)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


class ProgressBar(pl.Callback):
    """One tqdm bar per criterion stage, counted in the user's units (ANP iterations, RNP
    epochs); only in the first process."""

    def __init__(self, total: int, description: str, unit: str, per: str = "batch", enabled: bool = True) -> None:
        self.total, self.description, self.unit, self.per, self.enabled = total, description, unit, per, enabled
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.bar = tqdm(total=self.total, desc=self.description, unit=self.unit, leave=False,
                        disable=not (self.enabled and trainer.is_global_zero))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.per == "batch":
            self.bar.update(1)

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.per == "epoch":
            self.bar.update(1)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.bar.close()


class MaskStepModule(pl.LightningModule):
    """Runs a criterion's ``step`` (manual optimization) on every batch, ``iterations`` times in
    all; ``optimizers(masks)`` builds the optimizers the step is handed. ``step`` and
    ``optimizers`` are module-level functions or partials (so the module pickles for DDP)."""

    def __init__(self, model: nn.Module, masks: nn.Module, step: Step,
                 optimizers: Callable[[nn.Module], list[torch.optim.Optimizer]], iterations: int, seed: int) -> None:
        super().__init__()
        self.model, self.masks, self.step, self.make_optimizers = model, masks, step, optimizers
        self.iterations, self.seed = iterations, seed
        self.automatic_optimization = False
        self.generator: torch.Generator | None = None
        # a buffer, so that the count travels back from ddp_spawn's processes with the state dict
        self.register_buffer("iterations_run", torch.zeros((), dtype=torch.int64))

    def on_train_start(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + self.global_rank)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return self.make_optimizers(self.masks)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        self.step(self.model, self.masks, images, labels, optimizers, self.manual_backward, self.generator)
        self.iterations_run += 1
        if int(self.iterations_run) >= self.iterations:
            self.trainer.should_stop = True
