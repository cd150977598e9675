"""The torchmetrics counter behind the Lightning evaluations (imported on first use of
``bdpruning.evaluation.metrics.Count``, so that importing :mod:`bdpruning.evaluation.metrics` stays torchmetrics-free)."""

from __future__ import annotations

import torch
from torchmetrics import Metric

__all__ = ["Count"]


class Count(Metric):
    """How many of the flags given to :meth:`update` were true; int64, summed across processes."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, flags: torch.Tensor) -> None:
        # not in place: under ddp_spawn on CPU the initial state lives in memory shared by all
        # processes, where += would add every process's flags to one counter
        self.count = self.count + flags.sum(dtype=torch.int64)

    def compute(self) -> torch.Tensor:
        return self.count
