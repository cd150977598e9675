"""The one set of data checks, shared by the HDF5 reader (:mod:`.hdf5`), the data forms
(:mod:`.forms`) and the device feed (:mod:`.feed`): images, their shape, labels, batch size.

Each check names where the data came from (``where``: a file or a form) in a one-line
:class:`~bdpruning.errors.BdpruningError`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import BdpruningError

__all__ = ["check_batch_size", "check_image_shape", "check_images", "check_labels"]


def check_batch_size(batch_size: object) -> int:
    """``batch_size``, after checking it is an integer of at least 1."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise BdpruningError(f"batch size must be an integer of at least 1 (got {batch_size!r})")
    return batch_size


def check_image_shape(shape: Sequence[int], expected: Sequence[int] | None, where: str) -> None:
    """Refuse images of shape ``shape`` (C, H, W) where the model expects ``expected`` (if known)."""
    if expected is not None and tuple(shape) != tuple(expected):
        raise BdpruningError(f"{where}: images have shape {tuple(shape)}, the model expects {tuple(expected)}")


def check_images(images: torch.Tensor, where: str, image_shape: Sequence[int] | None) -> torch.Tensor:
    """``images`` as float32 after checking it is (N, C, H, W) of a real dtype (and ``image_shape``)."""
    if images.dim() != 4:
        hint = " (a single unbatched image?)" if images.dim() == 3 else ""
        raise BdpruningError(f"{where}: images have shape {tuple(images.shape)}{hint}, expected (N, C, H, W)")
    if images.dtype == torch.bool or images.is_complex():
        raise BdpruningError(f"{where}: images have dtype {images.dtype}, expected a float or integer dtype")
    check_image_shape(images.shape[1:], image_shape, where)
    return images.to(torch.float32)


def check_labels(labels: torch.Tensor, count: int, where: str, num_classes: int | None) -> torch.Tensor:
    """``labels`` as int64 after checking they are ``count`` integers in ``0..num_classes - 1``."""
    if labels.dim() != 1 or len(labels) != count:
        raise BdpruningError(f"{where}: labels have shape {tuple(labels.shape)}, expected ({count},) for {count} images")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise BdpruningError(f"{where}: labels have dtype {labels.dtype}, expected integers")
    labels = labels.to(torch.int64)
    if count and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
        classes = "" if num_classes is None else f", outside the model's {num_classes} classes (0..{num_classes - 1})"
        raise BdpruningError(f"{where}: labels range {int(labels.min())}..{int(labels.max())}{classes}")
    return labels
