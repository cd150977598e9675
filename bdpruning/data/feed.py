"""Feeding labelled images to a model on its device, as fast as the device takes them.

A profile of ``predict_labels`` on a GPU showed the data path, not the network, setting the
pace: every pass read the HDF5 set batch by batch, converted the uint8 pixels to float32 on
the CPU and copied four times the bytes to the device. :func:`model_batches` instead

- keeps a *decoded* set resident on the model's device in its stored dtype (uint8 for the
  course's files, a quarter of float32's bytes) when a memory check says it fits, converting
  each batch to the model's dtype on the device; an HDF5 set or an ``(images, labels)`` pair
  is loaded once per :class:`~bdpruning.data.forms.ImageData` (copies share it; every one over
  the same :class:`~bdpruning.data.hdf5.H5ImageSet` too, while that set lives), so the ranking,
  the sweep's passes and repeated evaluations read it once;
- otherwise streams the source's batches, on CUDA through pinned memory with non-blocking
  copies, one batch ahead, so the copy overlaps the computation.

Pixel values are unchanged: integers convert to float exactly, and stored floats round to
float32 as the HDF5 reader does. With ``channels_last`` the batches come in NHWC strides (the
fast layout of :mod:`bdpruning.graph.fused`); their values are the same.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .checks import check_batch_size
from .forms import ImageData
from .hdf5 import H5ImageSet

__all__ = ["model_batches", "resident_fits"]

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]

#: Share of the free memory a resident set may take (the rest is for activations and others).
CUDA_SHARE = 0.5
HOST_SHARE = 0.25
_CHUNK_BYTES = 64 << 20  # HDF5 reads and host-to-device copies, at most this much at a time


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * CUDA_SHARE)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * HOST_SHARE)
    except (ValueError, OSError, AttributeError):
        return 0


def resident_fits(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` may stay resident on ``device`` (a share of its free memory)."""
    return device.type in ("cuda", "cpu") and nbytes <= _free_bytes(device)


#: resident copies of HDF5 sets, by set: every ImageData over one set (each call of
#: predict_labels, the ranking, the sweep's passes) reads the file once while the set lives
_H5_RESIDENT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _SharedCache:
    """An ImageData's own resident cache, backed by its set's: read from either, written to both."""

    def __init__(self, own: dict, shared: dict) -> None:
        self.own, self.shared = own, shared

    def __contains__(self, key) -> bool:
        return key in self.own or key in self.shared

    def __getitem__(self, key):
        if key not in self.own:
            self.own[key] = self.shared[key]
        return self.own[key]

    def __setitem__(self, key, value) -> None:
        self.own[key] = self.shared[key] = value


def _resident(data: ImageData, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The set on ``device`` in its stored dtype (NHWC when ``channels_last``), loaded once."""
    source = getattr(data, "dataset", None)
    cache = _SharedCache(data.resident, _H5_RESIDENT.setdefault(source, {})) if isinstance(source, H5ImageSet) \
        else data.resident
    key = (str(device), channels_last)
    if key in cache:
        return cache[key]
    stored = data.stored()
    if stored is None:
        return None
    reader, dtype, shape, labels = stored.read, stored.dtype, stored.image_shape, stored.labels
    if stored.tensor is not None and stored.tensor.device == device and not channels_last:
        cache[key] = stored.tensor, labels.to(device)  # already there: no copy
        return cache[key]
    nbytes = len(data) * int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    if not resident_fits(nbytes, device):
        log.debug("%s: %.1f MB of images do not fit on %s; streaming batches", data.kind, nbytes / 1e6, device)
        cache[key] = None
        return None
    layout = (shape[1], shape[2], shape[0]) if channels_last and len(shape) == 3 else shape
    images = torch.empty((len(data), *layout), dtype=dtype, device=device)
    rows = max(1, _CHUNK_BYTES // max(1, nbytes // len(data)))
    for start in range(0, len(data), rows):
        block = reader(start, min(start + rows, len(data)))
        if layout is not shape:
            block = block.permute(0, 2, 3, 1)
        images[start:start + len(block)].copy_(block)
    log.debug("%s: %d images (%.1f MB, %s) resident on %s", data.kind, len(data), nbytes / 1e6, dtype, device)
    cache[key] = images, labels.to(device)
    return cache[key]


def _to_model(images: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """Stored rows (NHWC when ``channels_last``) as the model's input: float32 first, as the
    HDF5 reader gives, then ``dtype``; NCHW shape either way."""
    images = images.to(torch.float32)
    if dtype != torch.float32:
        images = images.to(dtype)
    if channels_last and images.dim() == 4:
        images = images.permute(0, 3, 1, 2)
    return images


def _streamed(data: ImageData, batch_size: int, device: torch.device, dtype: torch.dtype,
              channels_last: bool) -> Iterator[Batch]:
    """The source's checked batches; on CUDA copied from pinned memory one batch ahead."""
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def move(images: torch.Tensor, labels: torch.Tensor) -> Batch:
        if device.type == "cuda" and images.device.type == "cpu":
            images, labels = images.pin_memory(), labels.pin_memory()
        images = images.to(device, non_blocking=True).to(dtype)
        if images.dim() == 4:
            images = images.contiguous(memory_format=layout)
        return images, labels.to(device, non_blocking=True)

    pending = None
    for images, labels in data.batches(batch_size):
        batch = move(images, labels)
        if pending is not None:
            yield pending
        pending = batch
    if pending is not None:
        yield pending


def model_batches(data: ImageData, batch_size: int, model: nn.Module | torch.device, *,
                  dtype: torch.dtype | None = None, channels_last: bool = False) -> Iterator[Batch]:
    """``(images (N, C, H, W), labels int64 (N,))`` of ``data`` in order, ``batch_size`` at a
    time, on ``model``'s device and in its parameters' dtype (or ``model`` is the device and
    ``dtype`` defaults to float32). NHWC strides when ``channels_last``."""
    check_batch_size(batch_size)
    if isinstance(model, torch.device):
        device, dtype = model, dtype or torch.float32
    else:
        parameter = next(model.parameters())
        device, dtype = parameter.device, dtype or parameter.dtype
    resident = _resident(data, device, channels_last)
    if resident is None:
        yield from _streamed(data, batch_size, device, dtype, channels_last)
        return
    images, labels = resident
    for start in range(0, len(data), batch_size):
        yield _to_model(images[start:start + batch_size], dtype, channels_last), labels[start:start + batch_size]
