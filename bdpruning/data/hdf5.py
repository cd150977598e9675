"""The one reader of the course's HDF5 data sets (``data`` (N,3,H,W) 0..255, ``label`` (N,)).

Images stay on disk and are read in slices, so memory stays bounded for large sets. Pixels
are returned as float32 in their raw 0..255 range: the reference code does not scale them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import file_error
from .checks import check_image_shape, check_labels

__all__ = ["H5ImageSet", "read_h5_dataset"]


def _open_h5(path: Path) -> h5py.File:
    if not path.exists():
        raise file_error(path, "no such file")
    if path.is_dir():
        raise file_error(path, "is a directory, expected an HDF5 data file")
    try:
        return h5py.File(path, "r")
    except OSError:
        raise file_error(path, "not an HDF5 file") from None


class H5ImageSet(Dataset):
    """A validated HDF5 image set: ``(image float32 (3,H,W) in 0..255, label int64)`` items."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        num_classes: int | None = None,
        image_shape: Sequence[int] | None = None,
    ) -> None:
        self.path = Path(path)
        with _open_h5(self.path) as handle:
            missing = [key for key in ("data", "label") if key not in handle]
            if missing:
                raise file_error(
                    self.path,
                    f"missing dataset(s) {', '.join(repr(k) for k in missing)} "
                    f"(found: {', '.join(sorted(handle.keys())) or 'nothing'})",
                )
            data, label = handle["data"], handle["label"]
            if not isinstance(data, h5py.Dataset) or not isinstance(label, h5py.Dataset):
                raise file_error(self.path, "'data' and 'label' must be datasets, not groups")
            self._check_data(data, image_shape)
            self.labels = self._read_labels(label, len(data), num_classes)
            self.image_shape = tuple(int(s) for s in data.shape[1:])
        self._handle: h5py.File | None = None

    def _check_data(self, data: h5py.Dataset, image_shape: Sequence[int] | None) -> None:
        if data.ndim != 4:
            raise file_error(self.path, f"'data' has shape {data.shape}, expected (N, 3, H, W)")
        if len(data) == 0:
            raise file_error(self.path, "the data set is empty")
        if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
            raise file_error(self.path, f"'data' has dtype {data.dtype}, expected uint8 or float")
        if data.shape[1] != 3 and data.shape[3] == 3:
            raise file_error(
                self.path,
                f"'data' has shape {data.shape}: channels-last; expected channels-first "
                "(N, 3, H, W) as in the course's files (transpose with (0, 3, 1, 2))",
            )
        check_image_shape(data.shape[1:], image_shape, str(self.path))

    def _read_labels(self, label: h5py.Dataset, n: int, num_classes: int | None) -> torch.Tensor:
        values = np.asarray(label[()]).reshape(-1) if label.ndim <= 1 else None
        if values is None or len(values) != n:
            raise file_error(self.path, f"'label' has shape {label.shape}, expected ({n},)")
        if not np.issubdtype(values.dtype, np.number) or not np.all(np.isfinite(values)):
            raise file_error(self.path, "'label' must hold finite numbers")
        if np.any(values != np.round(values)):
            raise file_error(self.path, "'label' holds non-integer values")
        return check_labels(torch.from_numpy(values.astype(np.int64)), n, str(self.path), num_classes)

    def __len__(self) -> int:
        return len(self.labels)

    def _data(self) -> h5py.Dataset:
        if self._handle is None:  # opened lazily: each DataLoader worker gets its own handle
            self._handle = h5py.File(self.path, "r")
        return self._handle["data"]

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Images ``start:stop`` as a float32 tensor (raw 0..255)."""
        return torch.from_numpy(np.asarray(self._data()[start:stop], dtype=np.float32))

    @property
    def raw_dtype(self) -> np.dtype:
        """The dtype the file stores the images in (uint8 for the course's files)."""
        return self._data().dtype

    def raw(self, start: int, stop: int) -> np.ndarray:
        """Images ``start:stop`` as stored (no conversion), for readers that convert on the device."""
        return self._data()[start:stop]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.read(index, index + 1)[0], self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        order = np.argsort(indices)
        sorted_idx = np.asarray(indices)[order]
        if len(sorted_idx) and np.all(np.diff(sorted_idx) == 1):
            block = self.read(int(sorted_idx[0]), int(sorted_idx[-1]) + 1)
        else:
            unique, inverse = np.unique(sorted_idx, return_inverse=True)
            block = torch.from_numpy(np.asarray(self._data()[unique], dtype=np.float32))[inverse]
        images = torch.empty_like(block)
        images[torch.from_numpy(order)] = block
        return [(images[i], self.labels[index]) for i, index in enumerate(indices)]

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stream ``(images, labels)`` in order, ``batch_size`` at a time."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield self.read(start, stop), self.labels[start:stop]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = None
        return state

    def __del__(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self._handle.close()


def read_h5_dataset(
    path: str | os.PathLike[str],
    num_classes: int | None = None,
    image_shape: Sequence[int] | None = None,
) -> H5ImageSet:
    """Open and validate an HDF5 data set; labels are checked against ``num_classes``."""
    return H5ImageSet(path, num_classes=num_classes, image_shape=image_shape)
