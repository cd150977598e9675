"""The clean and poisoned sets (valid and test; a clean training set) as a LightningDataModule.

Each set is an HDF5 path or any other form :func:`bdpruning.data.forms.as_image_data` takes
that has random access (an ``H5ImageSet``, a map-style ``Dataset``, ``(images, labels)``
tensors; not a ``DataLoader``: the module batches, shards and shuffles itself).

Evaluation loaders come in the order of :data:`SET_NAMES`: the clean set first, then the
poisoned set when one is given, so ``dataloader_idx`` tells a step which set a batch is from.
Under DDP each process reads its own unpadded shard (:class:`ShardSampler`): Lightning's
``DistributedSampler`` pads with duplicates, which would be counted twice. Trainers using this
module need ``use_distributed_sampler=False``. The training loader shuffles with a seeded
``DistributedSampler`` (padded, so every process runs the same number of batches; Lightning
calls its ``set_epoch``), which gives the same order for a seed in one process or many.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import pytorch_lightning as pl
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from bdpruning.data.forms import DataLike, as_image_data, data_name
from bdpruning.errors import BdpruningError
from bdpruning.models import model_info

__all__ = ["DataLike", "ImageDataModule", "H5DataModule", "SET_NAMES", "ShardSampler"]

#: What ``dataloader_idx`` 0 and 1 of the evaluation loaders hold.
SET_NAMES = ("clean", "poisoned")

PathLike = str | os.PathLike[str]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of a set: every index on exactly one process."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ImageDataModule(pl.LightningDataModule):
    """Clean and poisoned sets for ``trainer.validate`` (valid sets) and ``trainer.test``,
    and a clean training set for ``trainer.fit``, shuffled with ``seed``.

    The sets are opened and validated here, in the launching process, so a bad file is one
    clear error before any worker process starts; labels are checked against ``num_classes``
    and images against ``image_shape`` and ``input_range`` (pass the model's).
    """

    def __init__(
        self,
        clean_test: DataLike | None = None,
        poisoned_test: DataLike | None = None,
        clean_valid: DataLike | None = None,
        poisoned_valid: DataLike | None = None,
        batch_size: int = 512,
        num_workers: int = 0,
        num_classes: int | None = None,
        image_shape: Sequence[int] | None = None,
        clean_train: DataLike | None = None,
        seed: int = 0,
        input_range: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise BdpruningError(f"batch size must be >= 1 and workers >= 0 (got {batch_size}, {num_workers})")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.named_sets: list[tuple[str, Dataset]] = []  # every set, for messages

        def read(data: DataLike | None) -> Dataset | None:
            if data is None:
                return None
            dataset = as_image_data(data, num_classes=num_classes, image_shape=image_shape,
                                    input_range=input_range).as_dataset()
            self.named_sets.append((data_name(data), dataset))
            return dataset

        self.test_sets = self._ordered(read(clean_test), read(poisoned_test), "test")
        self.valid_sets = self._ordered(read(clean_valid), read(poisoned_valid), "valid")
        self.train_set = read(clean_train)
        self.seed = seed

    @classmethod
    def for_model(cls, model: nn.Module, **sets_and_options) -> "ImageDataModule":
        """The sets, checked against ``model``'s classes, input shape and input range (see
        :func:`bdpruning.model_info`)."""
        info = model_info(model)
        return cls(**sets_and_options, num_classes=info.num_classes, image_shape=info.input_shape,
                   input_range=info.input_range)

    @staticmethod
    def _ordered(clean: Dataset | None, poisoned: Dataset | None, stage: str) -> list[Dataset]:
        if clean is None and poisoned is not None:
            raise BdpruningError(f"a poisoned {stage} set needs its clean {stage} set")
        return [s for s in (clean, poisoned) if s is not None]

    def check_processes(self, world_size: int) -> None:
        """Refuse a set with fewer images than processes (call it before processes are started)."""
        for name, dataset in self.named_sets:
            if len(dataset) < world_size:
                raise BdpruningError(f"{name}: {len(dataset)} images for {world_size} processes")

    def _rank_and_world_size(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _loaders(self, sets: list[Dataset], stage: str) -> list[DataLoader]:
        if not sets:
            raise BdpruningError(f"no clean {stage} set was given")
        rank, world_size = self._rank_and_world_size()
        self.check_processes(world_size)
        return [
            DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                       sampler=ShardSampler(len(dataset), rank, world_size))
            for dataset in sets
        ]

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise BdpruningError("no clean training set was given")
        rank, world_size = self._rank_and_world_size()
        sampler = DistributedSampler(self.train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers,
                          sampler=sampler)

    def val_dataloader(self) -> list[DataLoader]:
        return self._loaders(self.valid_sets, "valid")

    def test_dataloader(self) -> list[DataLoader]:
        return self._loaders(self.test_sets, "test")


#: The old name of :class:`ImageDataModule` (it takes any data, not only HDF5), kept for one release.
H5DataModule = ImageDataModule
