"""Batched inference over a data set: top-1 labels, with a progress bar."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.forms import DataLike, as_image_data
from ..runtime.devices import resolve_device
from ..graph.fused import in_cpu_batches, inference_module
from ..data.feed import model_batches
from ..numerics.precision import runs_in_precision_context

__all__ = ["predict_labels"]


@runs_in_precision_context
@torch.inference_mode()
def predict_labels(
    model: nn.Module,
    dataset: DataLike,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    progress: bool = False,
    *,
    tf32: bool = False,
) -> torch.Tensor:
    """Top-1 labels (int64, CPU) of ``model`` on every image of ``dataset``, in order; in IEEE
    fp32 unless ``tf32`` (see :func:`~bdpruning.numerics.precision.precision_context`).

    ``dataset`` is any form :func:`~bdpruning.data.forms.as_image_data` takes. The data stays
    on the model's device where it fits (:mod:`bdpruning.data.feed`) and the model runs in its fast
    inference form (:mod:`bdpruning.graph.fused`), with the same labels.
    """
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    dataset = as_image_data(dataset)
    fast = inference_module(model)
    batches = model_batches(dataset, batch_size, model, channels_last=fast.channels_last)
    total = -(-len(dataset) // batch_size)
    labels = [in_cpu_batches(fast, images).argmax(dim=1)
              for images, _ in tqdm(batches, total=total, disable=not progress, desc="predict", leave=False)]
    return torch.cat(labels).cpu()
