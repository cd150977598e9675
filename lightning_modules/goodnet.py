"""Evaluating GoodNet ensembles with Lightning: one B, one or more repaired models B'.

B runs once per batch; each B' gets its own counts (``"<i>/<count>"`` for the i-th B'), from
which :func:`goodnet_results` gives a :class:`bdpruning.evaluation.metrics.GoodNetResult` each::

    rows = evaluate_goodnets(bd, [repaired_2, repaired_4, repaired_10], "test.h5", "bd_test.h5")
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from bdpruning.errors import BdpruningError
from bdpruning.evaluation.goodnet import GoodNet
from bdpruning.evaluation.metrics import GOODNET_COUNTS, GoodNetResult, goodnet_outcomes

from .data import DataLike, ImageDataModule
from .evaluation import CountingModule, run_evaluation

__all__ = ["GoodNetModule", "goodnet_results", "evaluate_goodnets"]


class GoodNetModule(CountingModule):
    """Counts of B' and of GoodNet(B, B') for every repaired model, on clean and poisoned sets."""

    def __init__(self, bd: nn.Module, repaired: Sequence[nn.Module], tf32: bool = False) -> None:
        if not repaired:
            raise BdpruningError("GoodNet needs at least one repaired model B'")
        super().__init__((f"{i}/{name}" for i in range(len(repaired)) for name in GOODNET_COUNTS), tf32)
        self.goodnets = nn.ModuleList(GoodNet(bd, model) for model in repaired)

    def outcomes(self, images: torch.Tensor, labels: torch.Tensor, poisoned: bool) -> dict[str, torch.Tensor]:
        bd_predicted = self.goodnets[0].bd(images).argmax(dim=1)
        outcomes = {}
        for i, goodnet in enumerate(self.goodnets):
            repaired_predicted = goodnet.repaired(images).argmax(dim=1)
            flags = goodnet_outcomes(bd_predicted, repaired_predicted, labels, goodnet.num_classes, poisoned)
            outcomes.update({f"{i}/{name}": value for name, value in flags.items()})
        return outcomes


def goodnet_results(counts: dict[str, int], num_repaired: int) -> list[GoodNetResult]:
    """Counts and rates for each repaired model, from the counts of :class:`GoodNetModule`."""
    return [
        GoodNetResult.of({name: counts.get(f"{i}/{name}", 0) for name in GOODNET_COUNTS})
        for i in range(num_repaired)
    ]


def evaluate_goodnets(
    bd: nn.Module,
    repaired: Sequence[nn.Module],
    clean: DataLike,
    poisoned: DataLike | None = None,
    batch_size: int = 512,
    num_workers: int = 0,
    tf32: bool = False,
    **trainer_options,
) -> list[GoodNetResult] | None:
    """Counts and rates (percent) of B' and GoodNet(B, B') for each repaired model, in order; in IEEE fp32
    unless ``tf32`` (see :func:`~bdpruning.numerics.precision.precision_context`).

    Returns None in the extra processes of the ``ddp`` launcher; ``trainer_options`` go to
    :func:`~.evaluation.make_trainer`.
    """
    module = GoodNetModule(bd, repaired, tf32)  # refuses B' that do not match B
    data = ImageDataModule.for_model(bd, clean_test=clean, poisoned_test=poisoned, batch_size=batch_size,
                                  num_workers=num_workers)
    counts = run_evaluation(module, data, **trainer_options)
    return None if counts is None else goodnet_results(counts, len(repaired))
