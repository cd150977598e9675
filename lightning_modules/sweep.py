"""The pruning sweep data-parallel under Lightning: ranking and per-step counts, exact under DDP.

Two ``trainer.test`` passes over :class:`~.data.ImageDataModule`, whose loaders give every
process an unpadded shard (each image on exactly one process):

1. :class:`RankingModule` adds the rank layer's outputs into exact per-channel sums
   (:class:`bdpruning.criteria.activation.ActivationMeans`, int64 bins), summed across processes, so
   every process gets the single-process ranking to the last bit;
2. :class:`StepCountsModule` runs the model's prefix once per batch and the suffix per step, as
   the split engine does (:mod:`bdpruning.sweep.split_engine`), and counts the correct top-1 labels at every step on
   the clean and the poisoned set; the int64 counts are summed across processes.

The result is :func:`bdpruning.sweep.lab.sweep_result` of the ranking and counts: the steps and
thresholds equal a single process's. Use ``strategy="ddp"`` (Lightning re-runs the script or
command in each process; only the first gets the result) or one process::

    result = distributed_sweep(model, "clean_valid.h5", "poisoned_valid.h5", accelerator="cpu",
                               devices=2, strategy="ddp")
"""

from __future__ import annotations

from typing import Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from bdpruning.criteria.activation import ActivationMeans, MeanActivation, StopForward
from bdpruning.data.forms import DataLike, as_image_data
from bdpruning.models import model_expectations
from bdpruning.errors import BdpruningError
from bdpruning.graph.fused import inference_module
from bdpruning.graph.layers import find_layer
from bdpruning.numerics.precision import precision_context
from bdpruning.sweep.lab import SweepResult, check_thresholds, sweep_result
from bdpruning.sweep.split_engine import chunk_predictions, split_for

from .data import SET_NAMES, ImageDataModule
from .evaluation import make_trainer

__all__ = ["RankingModule", "StepCountsModule", "distributed_sweep"]


class RankingModule(pl.LightningModule):
    """Exact per-channel sums of ``rank_layer``'s output on this process's shard, computed as
    :func:`bdpruning.sweep.lab.run_sweep` does (the split's prefix when the split is at the rank
    layer, else a hook), then summed across processes; :attr:`means` holds the total."""

    def __init__(self, model: nn.Module, layer: str, rank_layer: str, tf32: bool = False) -> None:
        super().__init__()
        self.tf32 = tf32
        self.means = ActivationMeans()
        split = split_for(model, layer, rank_layer)
        self.channels_last = split.channels_last
        self.handle = None
        if split.node_name == rank_layer:
            self.run = split.prefix
        else:
            self.handle = find_layer(model, rank_layer)[1].register_forward_hook(self.means.stop_hook)
            fast = inference_module(model)  # after the hook: the hooked layer stays as it is
            self.run, self.channels_last = fast.module, fast.channels_last

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images = batch[0].contiguous(memory_format=torch.channels_last) if self.channels_last else batch[0]
        try:
            with precision_context(self.tf32):
                values = self.run(images)
            self.means.add(values[0])
        except StopForward:
            pass

    def on_test_epoch_end(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        means = self.means
        if means.sums.bins is None:  # a shard can be empty only with more processes than images
            raise BdpruningError("a process got no images to rank channels on")
        totals = torch.tensor([means.elements, means.samples], dtype=torch.int64, device=self.device)
        means.sums.bins = self.trainer.strategy.reduce(means.sums.bins, reduce_op="sum")
        means.elements, means.samples = (int(v) for v in self.trainer.strategy.reduce(totals, reduce_op="sum"))


class StepCountsModule(pl.LightningModule):
    """Correct top-1 counts after each sweep step (row 0: nothing pruned) on the clean set
    (``dataloader_idx`` 0) and the poisoned set (1), summed across processes."""

    def __init__(self, model: nn.Module, layer: str, rank_layer: str, order: Sequence[int], tf32: bool = False) -> None:
        super().__init__()
        self.split = split_for(model, layer, rank_layer)
        self.prefix, self.suffix = self.split.prefix, self.split.suffix  # registered: moved to the device
        self.order, self.tf32 = list(order), tf32
        self.register_buffer("counts", torch.zeros(len(SET_NAMES), len(order) + 1, dtype=torch.int64))
        self.totals: list[list[int]] = []

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        if self.split.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with precision_context(self.tf32):
            values = self.prefix(images)
            for step, predictions in enumerate(chunk_predictions(self.suffix, values, self.order)):
                self.counts[dataloader_idx, step] += (predictions == labels).sum()

    def on_test_epoch_end(self) -> None:
        self.totals = self.trainer.strategy.reduce(self.counts, reduce_op="sum").tolist()


def distributed_sweep(
    model: nn.Module,
    clean: DataLike,
    poisoned: DataLike | None = None,
    *,
    layer: str = "conv_3",
    rank_layer: str = "pool_3",
    thresholds: Sequence[float] = (2.0, 4.0, 10.0),
    full_sweep: bool = False,
    batch_size: int = 1024,
    tf32: bool = False,
    **trainer_options,
) -> SweepResult | None:
    """:func:`bdpruning.sweep.lab.run_sweep` data-parallel: the same result, exactly, from the
    processes ``trainer_options`` ask for (see :func:`~.evaluation.make_trainer`). Returns None
    in the extra processes of the ``ddp`` launcher."""
    if trainer_options.get("strategy") == "ddp_spawn":
        raise BdpruningError("the sweep runs data-parallel with --strategy ddp (ddp_spawn cannot return "
                             "the ranking to the second pass)")
    check_thresholds(thresholds)
    model = model.eval()
    expectations = model_expectations(model)
    criterion = MeanActivation(layer, rank_layer, batch_size=batch_size, tf32=tf32)
    layer_name, rank_name = criterion.layers(model, as_image_data(clean, **expectations))

    ranking_data = ImageDataModule(clean_test=clean, batch_size=batch_size, **expectations)
    ranker = RankingModule(model, layer_name, rank_name, tf32)
    trainer = make_trainer(**trainer_options)
    ranking_data.check_processes(trainer.world_size)
    trainer.test(ranker, datamodule=ranking_data, verbose=False)
    scores = criterion.scores_from(ranker.means.ranking(rank_name), layer_name, clean, 0.0)

    step_data = ImageDataModule(clean_test=clean, poisoned_test=poisoned, batch_size=batch_size, **expectations)
    counter = StepCountsModule(model, layer_name, rank_name, [channel for _, channel in scores.order], tf32)
    trainer = make_trainer(**trainer_options)
    trainer.test(counter, datamodule=step_data, verbose=False)
    if not trainer.is_global_zero:
        return None
    clean_count = len(step_data.test_sets[0])
    poisoned_count = len(step_data.test_sets[1]) if poisoned is not None else None
    return sweep_result(scores, counter.totals[0], counter.totals[1] if poisoned is not None else None,
                        clean_count, poisoned_count, thresholds, full_sweep, counter.split.node_name)
