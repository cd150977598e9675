"""Evaluation counts in this process, without Lightning: what ``bdprune evaluate`` and
``bdprune goodnet`` run on one device.

A start-up profile of ``bdprune evaluate`` showed importing pytorch_lightning and torchmetrics
(which imports torchvision) costing about twice ``import torch``, more than the evaluation
itself. One device needs none of it: the counts here are the same per-image outcomes of
:mod:`bdpruning.evaluation.metrics`, summed as int64, so they equal the Lightning evaluation's exactly
(which remains for ``--devices N``). The data stays on the device (:mod:`bdpruning.data.feed`) and
the models run in their fast inference forms (:mod:`bdpruning.graph.fused`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..data.forms import DataLike, as_image_data
from ..graph.fused import in_cpu_batches, inference_module
from ..data.feed import model_batches
from .metrics import EVALUATION_COUNTS, GOODNET_COUNTS, EvaluationResult, GoodNetResult, evaluation_outcomes, \
    goodnet_outcomes
from ..models import model_expectations, model_info
from ..numerics.precision import precision_context

__all__ = ["count_evaluation", "count_goodnets"]


def _count(outcomes: Callable[[torch.Tensor, torch.Tensor, bool], dict[str, torch.Tensor]], names: Sequence[str],
           reference: nn.Module, clean: DataLike, poisoned: DataLike | None, batch_size: int,
           channels_last: bool, tf32: bool) -> dict[str, int]:
    device = next(reference.parameters()).device
    counts = {name: torch.zeros((), dtype=torch.int64, device=device) for name in names}
    seen = set()
    with precision_context(tf32), torch.inference_mode():
        for data, is_poisoned in ((clean, False), (poisoned, True)):
            if data is None:
                continue
            data = as_image_data(data, **model_expectations(reference))
            for images, labels in model_batches(data, batch_size, reference, channels_last=channels_last):
                for name, flags in outcomes(images, labels, is_poisoned).items():
                    counts[name] += flags.sum(dtype=torch.int64)
                    seen.add(name)
    return {name: int(value) for name, value in counts.items() if name in seen}


def count_evaluation(model: nn.Module, clean: DataLike, poisoned: DataLike | None = None, *,
                     batch_size: int = 512, tf32: bool = False) -> EvaluationResult:
    """Counts and rates (percent) of ``model`` on its device, as
    :func:`~bdpruning.lightning_modules.evaluation.evaluate_model` gives them; IEEE fp32 unless ``tf32``."""
    model.eval()
    fast = inference_module(model)

    def outcomes(images: torch.Tensor, labels: torch.Tensor, is_poisoned: bool) -> dict[str, torch.Tensor]:
        return evaluation_outcomes(in_cpu_batches(fast.module, images).argmax(dim=1), labels, is_poisoned)

    counts = _count(outcomes, EVALUATION_COUNTS, model, clean, poisoned, batch_size, fast.channels_last, tf32)
    return EvaluationResult.of(counts)


def count_goodnets(bd: nn.Module, repaired: Sequence[nn.Module], clean: DataLike, poisoned: DataLike | None = None,
                   *, batch_size: int = 512, tf32: bool = False) -> list[GoodNetResult]:
    """Rates (percent) of B' and GoodNet(B, B') for each repaired model, on B's device, as
    :func:`~bdpruning.lightning_modules.goodnet.evaluate_goodnets` gives them."""
    from .goodnet import GoodNet

    goodnets = [GoodNet(bd, model) for model in repaired]  # refuses B' that do not match B
    num_classes = model_info(bd).num_classes
    device = next(bd.parameters()).device
    forms = [inference_module(model.to(device).eval()) for model in (bd, *repaired)]
    channels_last = all(form.channels_last for form in forms)
    names = [f"{i}/{name}" for i in range(len(goodnets)) for name in GOODNET_COUNTS]

    def outcomes(images: torch.Tensor, labels: torch.Tensor, is_poisoned: bool) -> dict[str, torch.Tensor]:
        bd_predicted = in_cpu_batches(forms[0].module, images).argmax(dim=1)
        flags = {}
        for i, form in enumerate(forms[1:]):
            repaired_labels = in_cpu_batches(form.module, images).argmax(dim=1)
            found = goodnet_outcomes(bd_predicted, repaired_labels, labels, num_classes, is_poisoned)
            flags.update({f"{i}/{name}": value for name, value in found.items()})
        return flags

    counts = _count(outcomes, names, bd, clean, poisoned, batch_size, channels_last, tf32)
    return [GoodNetResult.of({name: counts.get(f"{i}/{name}", 0) for name in GOODNET_COUNTS})
            for i in range(len(goodnets))]
