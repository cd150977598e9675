"""The one adapter from every accepted form of labelled image data to ordered batches.

Every entry point that takes data (ranking, the sweep, prediction, fine-tuning) accepts:

- an HDF5 path (``str`` or ``os.PathLike``) or an :class:`~bdpruning.data.hdf5.H5ImageSet`;
- a map-style ``Dataset`` of ``(image (C, H, W), label)`` items (a ``TensorDataset``, say);
- a ``DataLoader`` of ``(images, labels)`` batches that does not shuffle;
- an ``(images, labels)`` pair of tensors: images (N, C, H, W), labels (N,) integers.

:func:`as_image_data` turns each into an :class:`ImageData`, whose :meth:`ImageData.batches`
yields ``(images float32 (N, C, H, W), labels int64 (N,))`` in the data's own order, cut to the
requested batch size whatever the source's batching, so every form gives the same batches.
Pixels keep their values (no scaling). Anything else, or data of the wrong shape or dtype,
is refused with a one-line :class:`~bdpruning.errors.BdpruningError` naming what was expected.
"""

from __future__ import annotations

import copy
import numbers
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SubsetRandomSampler, TensorDataset,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

from .checks import check_batch_size, check_image_shape, check_images, check_labels
from .hdf5 import H5ImageSet, read_h5_dataset
from ..errors import BdpruningError
# moved to bdpruning.models.record (a model concern); re-exported until the sweep's callers switch
from ..models.record import range_of_images

__all__ = ["DataLike", "ImageData", "StoredImages", "as_image_data", "data_name"]

#: What :func:`as_image_data` accepts.
DataLike = Union[str, os.PathLike, H5ImageSet, Dataset, DataLoader, tuple, "ImageData"]

EXPECTED = ("an HDF5 path or H5ImageSet, a map-style Dataset of (image, label) items, a DataLoader of "
            "(images, labels) batches, or an (images, labels) pair of tensors")

Batch = tuple[torch.Tensor, torch.Tensor]


def _describe(value: object) -> str:
    """A short description of ``value`` for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if type(value).__module__ == "numpy":
        return f"a numpy {type(value).__name__}" + (f" of shape {value.shape}" if hasattr(value, "shape") else "")
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a value of type {type(value).__name__}"


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _rechunk(blocks: Iterable[Batch], size: int) -> Iterator[Batch]:
    """The rows of ``blocks`` again, ``size`` at a time (blocks of that size pass through uncopied)."""
    images, labels, held = [], [], 0
    for block_images, block_labels in blocks:
        if not held and len(block_labels) == size:
            yield block_images, block_labels
            continue
        start = 0
        while start < len(block_labels):
            take = min(size - held, len(block_labels) - start)
            images.append(block_images[start:start + take])
            labels.append(block_labels[start:start + take])
            held, start = held + take, start + take
            if held == size:
                yield _join(images), _join(labels)
                images, labels, held = [], [], 0
    if held:
        yield _join(images), _join(labels)


@dataclass(frozen=True)
class StoredImages:
    """Random access to data held whole, in memory or in an HDF5 file, in its stored dtype."""

    read: Callable[[int, int], torch.Tensor]  #: rows ``start:stop`` as stored (uint8 for the course's files)
    dtype: torch.dtype
    image_shape: tuple[int, ...]  #: (C, H, W)
    labels: torch.Tensor  #: int64, all of them
    tensor: torch.Tensor | None = None  #: the whole images tensor, when the data is one


class ImageData:
    """Labelled images in a fixed order with a known length, read in batches.

    Build one with :func:`as_image_data`. ``num_classes`` and ``image_shape`` (C, H, W), when
    set, are checked on every batch.
    """

    def __init__(self, kind: str, length: int) -> None:
        self.kind = kind
        self.length = length
        self.num_classes: int | None = None
        self.image_shape: tuple[int, ...] | None = None
        #: the set resident on a device, by :mod:`bdpruning.data.feed` (shared by copies)
        self.resident: dict = {}

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"ImageData({self.kind}, {self.length} images)"

    def _blocks(self, batch_size: int) -> Iterator[object]:
        """The source's batches, unchecked, in order."""
        raise NotImplementedError

    def _expect(self, num_classes: int | None, image_shape: Sequence[int] | None) -> None:
        """Record (and where possible check now) the expected class count and image shape."""
        self.num_classes = num_classes if num_classes is not None else self.num_classes
        self.image_shape = tuple(image_shape) if image_shape is not None else self.image_shape

    def _check(self, batch: object, index: int, image_shape: Sequence[int] | None) -> Batch:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2
                and all(isinstance(part, torch.Tensor) for part in batch)):
            raise BdpruningError(f"{self.kind}: batch {index} is {_describe(batch)}; "
                                 "expected an (images, labels) pair of tensors")
        where = f"{self.kind}, batch {index}"
        images = check_images(batch[0], where, image_shape)
        return images, check_labels(batch[1], len(images), where, self.num_classes)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """``(images float32 (N, C, H, W), labels int64 (N,))`` in order, ``batch_size`` at a time."""
        check_batch_size(batch_size)
        shape = self.image_shape

        def checked() -> Iterator[Batch]:
            nonlocal shape
            for index, batch in enumerate(self._blocks(batch_size)):
                images, labels = self._check(batch, index, shape)
                shape = tuple(images.shape[1:])  # every batch must match the first
                yield images, labels

        seen = 0
        for images, labels in _rechunk(checked(), batch_size):
            seen += len(labels)
            yield images, labels
        if seen != self.length:
            raise BdpruningError(f"{self.kind} gave {seen} images, but its length is {self.length}")

    def stored(self) -> StoredImages | None:
        """Random access to the images as stored, for data held whole (an HDF5 set, a pair of
        tensors); None for data that can only be streamed in batches."""
        return None

    def first_images(self, count: int = 1) -> torch.Tensor:
        """The first ``count`` images (fewer when the data is shorter)."""
        return next(self.batches(count))[0]

    def as_dataset(self) -> Dataset:
        """The same items as a map-style ``Dataset`` of ``(image float32 (C, H, W), label int64)``,
        for loaders that shard and shuffle themselves (fine-tuning, Lightning evaluation)."""
        raise NotImplementedError


class _H5Data(ImageData):
    """An HDF5 set, read in slices (never item by item)."""

    def __init__(self, dataset: H5ImageSet) -> None:
        super().__init__(str(dataset.path), len(dataset))
        self.dataset = dataset

    def _expect(self, num_classes: int | None, image_shape: Sequence[int] | None) -> None:
        super()._expect(num_classes, image_shape)
        check_image_shape(self.dataset.image_shape, self.image_shape, self.kind)
        check_labels(self.dataset.labels, self.length, self.kind, self.num_classes)

    def _blocks(self, batch_size: int) -> Iterator[object]:
        return self.dataset.batches(batch_size)

    def stored(self) -> StoredImages:
        dataset = self.dataset
        return StoredImages(lambda start, stop: torch.from_numpy(dataset.raw(start, stop)),
                            torch.from_numpy(np.empty(0, dataset.raw_dtype)).dtype, tuple(dataset.image_shape),
                            dataset.labels)

    def as_dataset(self) -> Dataset:
        return self.dataset  # keeps its block reads (__getitems__)


class _TensorData(ImageData):
    """An ``(images, labels)`` pair of tensors, checked whole when it is built."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, kind: str) -> None:
        super().__init__(kind, len(images) if images.dim() else 0)
        check_images(images, kind, None)
        check_labels(labels, len(images), kind, None)
        self.images, self.labels = images, labels

    def _expect(self, num_classes: int | None, image_shape: Sequence[int] | None) -> None:
        super()._expect(num_classes, image_shape)
        check_images(self.images[:0], self.kind, self.image_shape)
        check_labels(self.labels, self.length, self.kind, self.num_classes)

    def _blocks(self, batch_size: int) -> Iterator[object]:
        for start in range(0, self.length, batch_size):
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]

    def stored(self) -> StoredImages:
        images = self.images
        return StoredImages(lambda start, stop: images[start:stop], images.dtype, tuple(images.shape[1:]),
                            self.labels.to(torch.int64), images)

    def as_dataset(self) -> Dataset:
        return _CheckedItems(self)

    def _block_at(self, index: int) -> Batch:
        return self.images[index:index + 1], self.labels[index:index + 1]


def _item_label(label: object) -> int | None:
    if isinstance(label, numbers.Integral) and not isinstance(label, bool):
        return int(label)
    if isinstance(label, torch.Tensor) and label.numel() == 1 and label.dim() <= 1 and not (
            label.is_floating_point() or label.is_complex() or label.dtype == torch.bool):
        return int(label.item())
    return None


class _DatasetData(ImageData):
    """A map-style dataset of ``(image (C, H, W), label)`` items, batched here in index order."""

    def __init__(self, dataset: Dataset, length: int) -> None:
        super().__init__(f"dataset {type(dataset).__name__}", length)
        self.dataset = dataset

    def _items(self, indices: list[int]) -> list:
        getitems = getattr(self.dataset, "__getitems__", None)
        return list(getitems(indices)) if getitems is not None else [self.dataset[i] for i in indices]

    def _collate(self, items: list, start: int) -> Batch:
        images, labels = [], []
        for index, item in enumerate(items, start):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise BdpruningError(f"{self.kind}: item {index} is {_describe(item)}; expected an (image, label) pair")
            image, label = item
            if not isinstance(image, torch.Tensor) or image.dim() != 3:
                raise BdpruningError(f"{self.kind}: item {index}'s image is {_describe(image)}; "
                                     "expected a tensor (C, H, W)")
            if images and image.shape != images[0].shape:
                raise BdpruningError(f"{self.kind}: item {index}'s image has shape {tuple(image.shape)}, "
                                     f"item {start}'s {tuple(images[0].shape)}; all images must have one shape")
            value = _item_label(label)
            if value is None:
                raise BdpruningError(f"{self.kind}: item {index}'s label is {_describe(label)}; expected an integer")
            images.append(image)
            labels.append(value)
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64)

    def _blocks(self, batch_size: int) -> Iterator[object]:
        for start in range(0, self.length, batch_size):
            indices = list(range(start, min(start + batch_size, self.length)))
            yield self._collate(self._items(indices), start)

    def as_dataset(self) -> Dataset:
        return _CheckedItems(self)

    def _block_at(self, index: int) -> Batch:
        return self._collate([self.dataset[index]], index)


class _CheckedItems(Dataset):
    """Item ``i`` of tensor or dataset data, checked and cast like a batch of one."""

    def __init__(self, data: _TensorData | _DatasetData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.data._check(self.data._block_at(index), index, self.data.image_shape)
        return images[0], labels[0]


_SHUFFLING_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


def _loader_length(loader: DataLoader) -> int:
    """How many images ``loader`` yields in one pass, without loading any."""
    batch_sampler = loader.batch_sampler
    if batch_sampler is None:
        return len(loader.sampler)
    if type(batch_sampler) is BatchSampler:
        count = len(batch_sampler.sampler)
        return count - count % batch_sampler.batch_size if batch_sampler.drop_last else count
    return sum(len(batch) for batch in batch_sampler)


def _shuffles(loader: DataLoader) -> bool:
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    return any(isinstance(s, _SHUFFLING_SAMPLERS) or (isinstance(s, DistributedSampler) and s.shuffle)
               for s in samplers)


class _LoaderData(ImageData):
    """A ``DataLoader`` of ``(images, labels)`` batches, iterated as configured (workers and all)."""

    def __init__(self, loader: DataLoader) -> None:
        kind = f"DataLoader over {type(loader.dataset).__name__}"
        if isinstance(loader.dataset, IterableDataset):
            raise BdpruningError(f"{kind}: an IterableDataset has no fixed length and order; "
                                 "use a map-style Dataset")
        if _shuffles(loader):
            raise BdpruningError(f"{kind} shuffles, so every pass has another order; use shuffle=False")
        try:
            length = _loader_length(loader)
        except TypeError:
            raise BdpruningError(f"{kind}: its sampler has no length; expected a fixed-length loader") from None
        super().__init__(kind, length)
        self.loader = loader

    def _blocks(self, batch_size: int) -> Iterator[object]:
        return iter(self.loader)

    def as_dataset(self) -> Dataset:
        raise BdpruningError(f"{self.kind}: fine-tuning and Lightning evaluation batch, shard and shuffle the "
                             "data themselves; pass the DataLoader's dataset instead")


def _from_dataset(dataset: Dataset) -> ImageData:
    if isinstance(dataset, IterableDataset):
        raise BdpruningError(f"{type(dataset).__name__} is an IterableDataset (no fixed length); "
                             f"expected {EXPECTED}")
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return _TensorData(*dataset.tensors, kind="TensorDataset")
    try:
        length = len(dataset)
    except TypeError:
        raise BdpruningError(f"{type(dataset).__name__} has no __len__; expected a map-style Dataset") from None
    return _DatasetData(dataset, length)


def _from_pair(pair: tuple | list) -> ImageData:
    if len(pair) == 2 and all(isinstance(part, torch.Tensor) for part in pair):
        return _TensorData(pair[0], pair[1], kind="(images, labels) tensors")
    if len(pair) != 2:
        raise BdpruningError(f"got {_describe(pair)} items; expected {EXPECTED}")
    parts = " and ".join(_describe(part) for part in pair)
    hint = "; convert numpy arrays with torch.from_numpy" if "numpy" in parts else ""
    raise BdpruningError(f"got a {type(pair).__name__} of {parts}; expected an (images, labels) pair of tensors{hint}")


def _adapt(data: object, num_classes: int | None, image_shape: Sequence[int] | None) -> ImageData:
    if isinstance(data, ImageData):
        return copy.copy(data)
    if isinstance(data, (str, os.PathLike)):
        return _H5Data(read_h5_dataset(data, num_classes, image_shape))
    if isinstance(data, H5ImageSet):
        return _H5Data(data)
    if isinstance(data, DataLoader):
        return _LoaderData(data)
    if isinstance(data, Dataset):
        return _from_dataset(data)
    if isinstance(data, (tuple, list)):
        return _from_pair(data)
    hint = ""
    if isinstance(data, torch.Tensor):
        hint = "; a tensor alone has no labels, pass (images, labels)"
    elif type(data).__module__ == "numpy":
        hint = "; convert numpy arrays with torch.from_numpy and pass (images, labels)"
    raise BdpruningError(f"expected {EXPECTED}; got {_describe(data)}{hint}")


def as_image_data(
    data: DataLike, *, num_classes: int | None = None, image_shape: Sequence[int] | None = None,
    input_range: str | None = None,
) -> ImageData:
    """Adapt ``data`` (see the module docstring for the forms) to an :class:`ImageData`.

    Labels must lie in ``0..num_classes - 1`` and images have shape ``image_shape`` (C, H, W)
    when these are given; tensors and HDF5 sets are checked now, streamed data batch by batch.
    With ``input_range`` (the model's, see :data:`bdpruning.models.INPUT_RANGES`) the first
    images must lie in it: 0..255 pixels given to a model that takes 0..1 are refused.
    """
    adapted = _adapt(data, num_classes, image_shape)
    adapted._expect(num_classes, image_shape)
    if adapted.length == 0:
        raise BdpruningError(f"{adapted.kind}: the data set is empty")
    if input_range not in (None, "normalized"):
        _check_range(adapted, input_range)
    return adapted


def _check_range(data: ImageData, input_range: str) -> None:
    """Refuse data whose first images lie outside the model's ``input_range`` (0..255 or 0..1)."""
    images = data.first_images(256)
    found = range_of_images(images)
    if found is None or found == input_range:
        return
    low, high = float(images.min()), float(images.max())
    fix = {("0..255", "0..1"): "divide the images by 255", ("0..1", "0..255"): "multiply the images by 255"}.get(
        (found, input_range), "give the images the model was trained on")
    raise BdpruningError(f"{data.kind}: images range {low:g}..{high:g} ({found}), but the model takes {input_range}: "
                         f"{fix}, or record the model's range (adopt(..., input_range=...) or --input-range)")


def data_name(data: DataLike) -> str:
    """How results name a data set: its path for HDF5 data, else its type."""
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    if isinstance(data, H5ImageSet):
        return str(data.path)
    if isinstance(data, ImageData):
        return data.kind
    if isinstance(data, (tuple, list)):
        return "(images, labels) tensors"
    if isinstance(data, DataLoader):
        return f"DataLoader over {type(data.dataset).__name__}"
    return f"dataset {type(data).__name__}"

