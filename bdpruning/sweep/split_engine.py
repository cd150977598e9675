"""The split sweep engine: the fast strategy when every pruned channel is in one layer.

The model is split after the layer where a pruned channel first becomes exactly zero (the
rank layer when the path there keeps it zero, e.g. ``pool_3`` for DeepID; else the pruned
layer, after its masked BatchNorm). The prefix runs once per image, and each step re-runs only
the suffix, and only on the images whose pruned channel is non-zero there (the others cannot
change). The prefix outputs of the clean set can feed the mean activation
(:class:`~bdpruning.criteria.activation.ActivationMeans`) and be kept for the sweep.
"""

from __future__ import annotations

import logging
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..criteria.activation import ActivationMeans
from ..data.feed import model_batches
from ..data.forms import DataLike, ImageData, as_image_data
from ..graph.fused import fast_split, in_cpu_batches
from ..graph.layers import find_layer
from ..graph.split import SplitModel, per_image, split_at, zero_preserving_path
from ..numerics.precision import runs_in_precision_context
from ..pruning.masks import following_batchnorm
from .incremental import IncrementalSuffix, incremental_suffix

__all__ = ["SplitEngine", "chunk_predictions", "split_for", "sweep_predictions"]

log = logging.getLogger(__name__)


def split_for(model: nn.Module, layer: str, rank_layer: str | None = None) -> SplitModel:
    """Split where a pruned channel of ``layer`` is last known to be exactly zero: at
    ``rank_layer`` when the path there keeps it zero, else right after the layer (after its
    masked BatchNorm)."""
    layer = find_layer(model, layer)[0]
    masked_end = following_batchnorm(model, layer) or layer
    if rank_layer is not None:
        rank_layer = find_layer(model, rank_layer)[0]
        if masked_end == rank_layer or zero_preserving_path(model, masked_end, rank_layer):
            return fast_split(split_at(model, rank_layer))
        log.info("pruning %s does not zero %s channels exactly; splitting at %s", layer, rank_layer, masked_end)
    return fast_split(split_at(model, masked_end))


def chunk_predictions(suffix: nn.Module, values: tuple, order: Sequence[int],
                      incremental: IncrementalSuffix | None = None, force: bool = False) -> Iterator[torch.Tensor]:
    """Yield the top-1 labels of one chunk of prefix outputs at step 0 (nothing pruned), then
    after each step of ``order`` (channels at the split). With ``incremental``, the logits of
    the images a step changes are updated by the pruned channel's contribution and only those
    whose margin lies within the round-off bounds re-run ``suffix``
    (:mod:`bdpruning.sweep.incremental`), where that is estimated cheaper than re-running
    ``suffix`` (always with ``force``)."""
    value, others = values[0], values[1:]
    n = value.shape[0]
    batched = [per_image(o, n) for o in others]

    def rerun(active: torch.Tensor) -> torch.Tensor:
        rows = [o[active] if b else o for o, b in zip(others, batched)]
        return suffix(masked[active], *rows).argmax(dim=1)

    predictions = suffix(value, *others).argmax(dim=1)
    yield predictions
    worth = incremental is not None and order and (force or incremental.worth(values))
    state = incremental.start(values) if worth else None
    # the split's values as pruned so far: the incremental steps zero the pruned channel in the
    # state's own copy (read here before each step); without them, a copy zeroed here
    masked = value.clone() if state is None else state.values[incremental.split]
    for channel in order:
        active = masked[:, channel].reshape(n, -1).any(dim=1).nonzero().squeeze(1)
        if state is None:
            masked[:, channel] = 0
        if active.numel():
            predictions = predictions.clone()
            if state is None:
                predictions[active] = rerun(active)
            else:
                logits = incremental.step(state, active, channel)
                labels, unsure = incremental.decide(logits, state)
                unsure = unsure.nonzero().squeeze(1)
                if unsure.numel():
                    incremental.fallbacks += unsure.numel()
                    labels[unsure] = rerun(active[unsure])
                predictions[active] = labels
        yield predictions


class SplitEngine:
    """Sweeps of one layer's channels on a split model (see the module docstring)."""

    #: every step costs only suffix runs: counting them all costs little more than a few
    sweeps_every_step = True

    def __init__(self, model: nn.Module, layer: str, rank_layer: str | None = None, *,
                 incremental: bool | None = None) -> None:
        self.split = split_for(model, layer, rank_layer)
        self.device = next(model.parameters()).device
        self.masked_at = self.split.node_name
        # None: the incremental update where it is estimated cheaper; True: always (where it applies)
        self.incremental = incremental_suffix(model, self.masked_at) if incremental is not False else None
        self.force = bool(incremental)
        self._cached: tuple[ImageData, list] | None = None

    def prefix_chunks(self, data: ImageData, batch_size: int, desc: str, progress: bool
                      ) -> Iterator[tuple[tuple, torch.Tensor]]:
        """``(prefix outputs, labels)`` per batch of ``data`` (kept ones when ``data`` was cached)."""
        if self._cached is not None and self._cached[0] is data:
            yield from self._cached[1]
            return
        total = -(-len(data) // batch_size)
        batches = model_batches(data, batch_size, self.split.prefix, channels_last=self.split.channels_last)
        for images, labels in tqdm(batches, total=total, disable=not progress, desc=desc, leave=False):
            yield in_cpu_batches(self.split.prefix, images), labels.to(self.device)

    @torch.inference_mode()
    def means_and_cache(self, clean: ImageData, batch_size: int, cache_bytes: int, progress: bool) -> ActivationMeans:
        """The mean activation at the split, from the prefix outputs, which are kept for the
        sweep of ``clean`` while they fit in ``cache_bytes``."""
        means, cached, used = ActivationMeans(), [], 0
        for values, labels in self.prefix_chunks(clean, batch_size, f"rank {self.masked_at}", progress):
            means.add(values[0])
            if cached is not None:
                used += sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
                if used <= cache_bytes:
                    cached.append((values, labels))
                else:  # too large to keep: the sweep recomputes the prefix, chunk by chunk
                    cached = None
        self._cached = None if cached is None else (clean, cached)
        return means

    @torch.inference_mode()
    def counts(self, data: ImageData, order: Sequence[tuple[str, int]], steps: Sequence[int], batch_size: int,
               progress: bool, desc: str = "sweep") -> list[int]:
        """How many images keep their label with ``order[:k]`` pruned, for each ``k`` of ``steps``."""
        channels = [channel for _, channel in order[: max(steps)]]
        counts = torch.zeros(len(channels) + 1, dtype=torch.long, device=self.device)
        for values, labels in self.prefix_chunks(data, batch_size, desc, progress):
            for step, predictions in enumerate(chunk_predictions(self.split.suffix, values, channels,
                                                                 self.incremental, self.force)):
                counts[step] += (predictions == labels).sum()
        every = counts.tolist()
        return [every[k] for k in steps]


@runs_in_precision_context
@torch.inference_mode()
def sweep_predictions(
    model: nn.Module, dataset: DataLike, order: Sequence[int], layer: str = "conv_3",
    rank_layer: str = "pool_3", batch_size: int = 1024, *, tf32: bool = False,
) -> torch.Tensor:
    """Top-1 labels after each step, shape ``(len(order) + 1, N)`` (row 0: nothing pruned)."""
    dataset = as_image_data(dataset)
    model.eval()
    engine = SplitEngine(model, layer, rank_layer)
    columns = [torch.stack(list(chunk_predictions(engine.split.suffix, values, order, engine.incremental, engine.force))).cpu()
               for values, _ in engine.prefix_chunks(dataset, batch_size, "sweep", False)]
    return torch.cat(columns, dim=1)
