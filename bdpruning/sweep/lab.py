"""The pruning sweep: prune channels one at a time in ranking order, record accuracy and ASR.

Reproduces the reference procedure exactly but runs the network once per batch: the model is
split after the layer where a pruned channel first becomes exactly zero (``pool_3`` for DeepID,
else the pruned layer itself), the prefix runs once, and each step re-runs only the suffix, and
only on the images whose pruned channel is non-zero there (the others cannot change).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..criteria.activation_means import ActivationMeans, ChannelRanking, rank_channels
from ..data.forms import DataLike, ImageData, as_image_data, model_expectations
from ..errors import BdpruningError
from ..graph.fused import fast_split
from ..data.feed import model_batches
from ..graph.layers import find_layer
from ..pruning.masks import channel_count, following_batchnorm, prune_channels
from ..numerics.precision import precision_record, runs_in_precision_context
from ..evaluation.predict import predict_labels
from ..graph.split import SplitModel, check_fed_by, split_at, zero_preserving_path

__all__ = [
    "SweepStep", "ThresholdHit", "SweepResult", "run_sweep", "find_thresholds",
    "naive_sweep_predictions", "sweep_predictions", "check_thresholds", "sweep_layers", "sweep_result",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepStep:
    """One step: ``channels_pruned`` channels removed, the last being ``channel``."""

    step: int
    channel: int | None
    fraction_pruned: float
    clean_accuracy: float
    attack_success_rate: float | None
    accuracy_drop: float


@dataclass(frozen=True)
class ThresholdHit:
    """Where the accuracy drop first reached ``threshold`` points (``step`` None: never)."""

    threshold: float
    step: int | None
    clean_accuracy: float | None = None
    attack_success_rate: float | None = None
    fraction_pruned: float | None = None

    @property
    def reached(self) -> bool:
        return self.step is not None


@dataclass
class SweepResult:
    """Everything a sweep measured; ``steps`` stop at the last threshold unless full."""

    layer: str
    rank_layer: str
    ranking: ChannelRanking
    steps: list[SweepStep]
    thresholds: list[ThresholdHit]
    clean_samples: int
    poisoned_samples: int | None
    masked_at: str
    full_sweep: bool
    all_steps: list[SweepStep] = field(repr=False, default_factory=list)
    precision: dict = field(default_factory=dict)  # precision_record() of the run


def _others(values: Sequence[torch.Tensor], n: int) -> list[bool]:
    return [isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n for v in values]


def _prefix_chunks(split: SplitModel, dataset: ImageData, batch_size: int, device: torch.device,
                   desc: str, progress: bool) -> Iterator[tuple[tuple, torch.Tensor]]:
    total = -(-len(dataset) // batch_size)
    batches = model_batches(dataset, batch_size, split.prefix, channels_last=split.channels_last)
    for images, labels in tqdm(batches, total=total, disable=not progress, desc=desc, leave=False):
        yield split.prefix(images), labels.to(device)


def _chunk_predictions(suffix: nn.Module, values: tuple, order: Sequence[int]) -> Iterator[torch.Tensor]:
    """Yield the top-1 labels of one chunk at step 0 (nothing pruned), then after each step."""
    value, others = values[0], values[1:]
    n = value.shape[0]
    batched = _others(others, n)
    predictions = suffix(value, *others).argmax(dim=1)
    yield predictions
    masked = value.clone()
    for channel in order:
        active = masked[:, channel].reshape(n, -1).ne(0).any(dim=1).nonzero().squeeze(1)
        masked[:, channel] = 0
        if active.numel():
            rows = [o[active] if b else o for o, b in zip(others, batched)]
            predictions = predictions.clone()
            predictions[active] = suffix(masked[active], *rows).argmax(dim=1)
        yield predictions


def _split_for(model: nn.Module, layer: str, rank_layer: str) -> SplitModel:
    """Split where a pruned channel is last known to be exactly zero: at the rank layer when
    the path there keeps it zero, else right after the layer (after its masked BatchNorm)."""
    layer, rank_layer = find_layer(model, layer)[0], find_layer(model, rank_layer)[0]
    masked_end = following_batchnorm(model, layer) or layer
    if masked_end == rank_layer or zero_preserving_path(model, masked_end, rank_layer):
        return fast_split(split_at(model, rank_layer))
    log.info("pruning %s does not zero %s channels exactly; splitting at %s", layer, rank_layer, masked_end)
    return fast_split(split_at(model, masked_end))


@runs_in_precision_context
@torch.inference_mode()
def sweep_predictions(
    model: nn.Module, dataset: DataLike, order: Sequence[int], layer: str = "conv_3",
    rank_layer: str = "pool_3", batch_size: int = 1024, *, tf32: bool = False,
) -> torch.Tensor:
    """Top-1 labels after each step, shape ``(len(order) + 1, N)`` (row 0: nothing pruned)."""
    dataset = as_image_data(dataset)
    model.eval()
    split = _split_for(model, layer, rank_layer)
    device = next(model.parameters()).device
    columns = [torch.stack(list(_chunk_predictions(split.suffix, values, order))).cpu()
               for values, _ in _prefix_chunks(split, dataset, batch_size, device, "sweep", False)]
    return torch.cat(columns, dim=1)


@runs_in_precision_context
@torch.inference_mode()
def naive_sweep_predictions(
    model: nn.Module, dataset: DataLike, order: Sequence[int], layer: str = "conv_3", batch_size: int = 1024,
    *, tf32: bool = False,
) -> torch.Tensor:
    """The reference procedure: a full forward of the masked model at every step (slow)."""
    dataset = as_image_data(dataset)
    rows = [predict_labels(model, dataset, batch_size, tf32=tf32)]
    for step in range(1, len(order) + 1):
        pruned = prune_channels(copy.deepcopy(model), layer, order[:step])
        rows.append(predict_labels(pruned, dataset, batch_size, tf32=tf32))
    return torch.stack(rows)


def _correct_counts(split: SplitModel, dataset: ImageData, order: Sequence[int], batch_size: int,
                    device: torch.device, cached: list | None, desc: str, progress: bool) -> list[int]:
    counts = torch.zeros(len(order) + 1, dtype=torch.long, device=device)
    chunks = cached if cached is not None else _prefix_chunks(split, dataset, batch_size, device, desc, progress)
    for values, labels in chunks:
        for step, predictions in enumerate(_chunk_predictions(split.suffix, values, order)):
            counts[step] += (predictions == labels).sum()
    return counts.tolist()


def _rank_and_cache(split: SplitModel, rank_layer: str, clean: ImageData, batch_size: int,
                    device: torch.device, cache_bytes: int, progress: bool) -> tuple[ChannelRanking, list | None]:
    """Rank from the prefix outputs (the rank layer's values) and keep them while they fit."""
    means, cached, used = ActivationMeans(), [], 0
    for values, labels in _prefix_chunks(split, clean, batch_size, device, f"rank {rank_layer}", progress):
        means.add(values[0])
        if cached is not None:
            used += sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
            if used <= cache_bytes:
                cached.append((values, labels))
            else:  # too large to keep: the sweep recomputes the prefix, chunk by chunk
                cached = None
    return means.ranking(split.node_name), cached


def _percent(correct: int, total: int) -> float:
    return 100.0 * correct / total


def find_thresholds(correct: Sequence[int], total: int, thresholds: Sequence[float]) -> list[int | None]:
    """For each threshold T (points), the first step whose accuracy drop is at least T.

    Computed on integer counts, so a drop of exactly T points counts as reached.
    """
    hits = []
    for threshold in thresholds:
        t = Fraction(str(threshold))
        hit = next((k for k in range(1, len(correct)) if (correct[0] - correct[k]) * 100 >= t * total), None)
        hits.append(hit)
    return hits


@runs_in_precision_context
def run_sweep(
    model: nn.Module,
    clean: DataLike,
    poisoned: DataLike | None = None,
    *,
    layer: str = "conv_3",
    rank_layer: str = "pool_3",
    thresholds: Sequence[float] = (2.0, 4.0, 10.0),
    full_sweep: bool = False,
    batch_size: int = 1024,
    cache_bytes: int = 1 << 30,
    progress: bool = False,
    tf32: bool = False,
) -> SweepResult:
    """Rank ``layer``'s channels on ``clean`` by ``rank_layer``'s mean activation, then prune
    them one by one, recording clean accuracy and (with ``poisoned``) the attack success rate.
    Everything runs in IEEE fp32 unless ``tf32`` (see :func:`~bdpruning.numerics.precision.precision_context`).

    ``clean`` and ``poisoned`` take any form of :func:`~bdpruning.data.forms.as_image_data`;
    ``rank_layer`` must be computed from ``layer`` (checked in the traced graph)."""
    check_thresholds(thresholds)
    clean = as_image_data(clean, **model_expectations(model))
    poisoned = None if poisoned is None else as_image_data(poisoned, **model_expectations(model))
    model.eval()
    device = next(model.parameters()).device
    layer_name, rank_name, _ = sweep_layers(model, clean, layer, rank_layer, thresholds, tf32)
    split = _split_for(model, layer_name, rank_name)
    with torch.inference_mode():
        if split.node_name == rank_name:
            ranking, cached = _rank_and_cache(split, rank_name, clean, batch_size, device, cache_bytes, progress)
        else:
            ranking, cached = rank_channels(model, clean, rank_name, batch_size, progress, tf32=tf32), None
        clean_correct = _correct_counts(split, clean, ranking.order, batch_size, device, cached, "sweep clean", progress)
        poisoned_hits = None
        if poisoned is not None:
            poisoned_hits = _correct_counts(split, poisoned, ranking.order, batch_size, device, None,
                                            "sweep poisoned", progress)
    return sweep_result(layer_name, rank_name, ranking, clean_correct, poisoned_hits, len(clean),
                        None if poisoned is None else len(poisoned), thresholds, full_sweep, split.node_name)


def check_thresholds(thresholds: Sequence[float]) -> None:
    """Refuse an empty list of thresholds or one that is not a positive number of points."""
    if not thresholds or any(not t > 0 for t in thresholds):
        raise BdpruningError(f"thresholds must be positive numbers of points, got {list(thresholds)}")


def sweep_layers(model: nn.Module, clean: ImageData, layer: str, rank_layer: str, thresholds: Sequence[float],
                 tf32: bool = False) -> tuple[str, str, int]:
    """Check a sweep's thresholds and layers (``rank_layer`` fed by ``layer``, as many channels);
    return the pruned layer's and the rank layer's module names and the channel count."""
    check_thresholds(thresholds)
    layer_name, module = find_layer(model, layer)
    rank_name, _ = find_layer(model, rank_layer)
    channels = channel_count(module)
    check_fed_by(model, layer_name, rank_name)
    with torch.inference_mode():
        probe = rank_channels(model, (clean.first_images(1), torch.zeros(1, dtype=torch.int64)), rank_name, tf32=tf32)
    if len(probe.order) != channels:
        raise BdpruningError(
            f"rank layer {rank_name!r} has {len(probe.order)} channels but {layer_name!r} has {channels}; "
            "choose a rank layer fed by the pruned layer"
        )
    return layer_name, rank_name, channels


def sweep_result(layer_name: str, rank_name: str, ranking: ChannelRanking, clean_correct: Sequence[int],
                 poisoned_hits: Sequence[int] | None, clean_count: int, poisoned_count: int | None,
                 thresholds: Sequence[float], full_sweep: bool, masked_at: str) -> SweepResult:
    """The :class:`SweepResult` of a ranking and the per-step correct counts (step 0: nothing
    pruned) on ``clean_count`` clean and ``poisoned_count`` poisoned images."""
    channels = len(ranking.order)
    steps = []
    for k in range(channels + 1):
        accuracy = _percent(clean_correct[k], clean_count)
        steps.append(SweepStep(
            step=k,
            channel=ranking.order[k - 1] if k else None,
            fraction_pruned=k / channels,
            clean_accuracy=accuracy,
            attack_success_rate=None if poisoned_hits is None else _percent(poisoned_hits[k], poisoned_count),
            accuracy_drop=steps[0].clean_accuracy - accuracy if steps else 0.0,
        ))
    hits = find_thresholds(clean_correct, clean_count, thresholds)
    found = [ThresholdHit(t, k, steps[k].clean_accuracy, steps[k].attack_success_rate, steps[k].fraction_pruned)
             if k is not None else ThresholdHit(t, None) for t, k in zip(thresholds, hits)]
    last = channels if full_sweep or None in hits else max(hits)
    for hit in found:
        if not hit.reached:
            log.warning("accuracy never dropped by %g points: no repaired model for that threshold", hit.threshold)
    return SweepResult(layer_name, rank_name, ranking, steps[: last + 1], found, clean_count, poisoned_count,
                       masked_at, full_sweep, steps, precision_record())
