"""The one pruning loop, for every criterion: score, sweep the criterion's order with the
fastest exact engine that applies, find the accuracy-drop thresholds and the criterion's choice.

A criterion (:mod:`bdpruning.criteria`) only chooses; this module prunes and measures::

    result = sweep_criterion(model, CLP(u=3), clean_valid, poisoned_valid)
    result.chosen          # the criterion's own B': channels pruned, clean accuracy, ASR
    result.points()        # accuracy and ASR for each u
    result = sweep_criterion(model, ANP(), clean_valid, poisoned_valid, thresholds=(2, 4, 10))
    result.thresholds      # B'_T as in the lab: the first step whose accuracy drop reaches T

The criterion sees the clean set only; poisoned data is only used to report the ASR. Two exact
engines (strategies) count the correct labels along the order, chosen automatically:

- :class:`~bdpruning.sweep.split_engine.SplitEngine` when every channel of the order is in one
  layer and the model splits there (the lab's case); for the mean activation
  (:class:`~bdpruning.criteria.activation.MeanActivation`) the split's prefix outputs also give
  the ranking, and are kept for the sweep;
- :class:`~bdpruning.sweep.masked.MaskedEngine` otherwise (any layers, a masked forward pass).

Evaluated: the criterion's choice and every reported value of its parameter; with thresholds,
every step up to the last one reached (to the end when one is never reached, or with
``full_sweep``), as the lab's sweep.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

from torch import nn

from ..criteria.base import ChannelScores, Criterion
from ..data.forms import DataLike, ImageData, as_image_data
from ..models.record import model_expectations
from ..errors import BdpruningError
from ..numerics.precision import runs_in_precision_context
from .budget import apply_budget, check_held_out
from .masked import MaskedEngine
from .result import DefenseResult, check_thresholds, find_thresholds, last_step, sweep_outcome
from .split_engine import SplitEngine

__all__ = ["choose_engine", "sweep_criterion", "sweep_scores", "run_defense", "defense_sweep"]

log = logging.getLogger(__name__)


def choose_engine(model: nn.Module, order: Sequence[tuple[str, int]], rank_layer: str | None = None,
                  tf32: bool = False, keep_shift: bool = False) -> SplitEngine | MaskedEngine:
    """The split engine when ``order``'s channels are all in one layer and the model splits
    there (at ``rank_layer`` when the path keeps a pruned channel zero); else the masked one,
    which alone sweeps channels that keep their shift (``keep_shift``: ANP's and RNP's pruning)."""
    layers = {layer for layer, _ in order}
    if len(layers) == 1 and not keep_shift:
        try:
            return SplitEngine(model, layers.pop(), rank_layer)
        except BdpruningError as error:  # untraceable, or a layer called twice
            log.info("the split engine does not apply (%s): the masked engine sweeps", error)
    return MaskedEngine(model, tf32, keep_shift)


def _consecutive(engine, order: list, clean: ImageData, thresholds: Sequence[float], wanted: int,
                 every_step: bool, batch_size: int, progress: bool) -> list[int]:
    """Clean counts at every step from 0 until ``wanted`` and every threshold are reached (or
    to the end): at once where steps are cheap, else in doubling blocks."""
    total = len(order)
    if every_step or engine.sweeps_every_step:
        return engine.counts(clean, order, range(total + 1), batch_size, progress, "sweep clean")
    correct: list[int] = []
    block = 16
    while True:
        start = max(len(correct) - 1, 0)
        stop = min(total, max(start + block, wanted))
        correct = correct[:start] + engine.counts(clean, order, range(start, stop + 1), batch_size, progress)
        if stop == total or (len(correct) > wanted and None not in find_thresholds(correct, len(clean), thresholds)):
            return correct
        block *= 2


def _adapted(model: nn.Module, clean: DataLike, poisoned: DataLike | None) -> tuple[ImageData, ImageData | None]:
    expectations = model_expectations(model)
    return (as_image_data(clean, **expectations),
            None if poisoned is None else as_image_data(poisoned, **expectations))


@runs_in_precision_context
def sweep_scores(
    model: nn.Module, scores: ChannelScores, clean: DataLike, poisoned: DataLike | None = None, *,
    thresholds: Sequence[float] = (), full_sweep: bool = False, every_step: bool = False, batch_size: int = 1024,
    progress: bool = False, tf32: bool = False, max_accuracy_drop: float | None = None,
) -> DefenseResult:
    """Prune along ``scores.order`` and measure; in IEEE fp32 unless ``tf32``.

    Evaluated: the criterion's choice and every reported value of its parameter; with
    ``thresholds`` (accuracy drops in points) every step up to the last one reached (to the end
    when one is never reached, or with ``full_sweep``); with ``every_step``, every step (the
    result's ``all_steps``; its ``steps`` still stop at the last threshold). ``max_accuracy_drop``
    (points) caps the criterion's choice (:func:`~bdpruning.sweep.budget.apply_budget`)."""
    check_thresholds(thresholds, required=False)
    clean, poisoned = _adapted(model, clean, poisoned)
    model.eval()
    engine = choose_engine(model, scores.order, tf32=tf32, keep_shift=scores.keep_shift)
    if max_accuracy_drop is not None:
        scores = apply_budget(engine, scores, clean, max_accuracy_drop, batch_size=batch_size, progress=progress)
    return _sweep(model, scores, clean, poisoned, thresholds, full_sweep, every_step, batch_size, progress, engine)


def _sweep(model: nn.Module, scores: ChannelScores, clean: ImageData, poisoned: ImageData | None,
           thresholds: Sequence[float], full_sweep: bool, every_step: bool, batch_size: int, progress: bool,
           engine: SplitEngine | MaskedEngine) -> DefenseResult:
    order = scores.order
    raw = [scores.budget["raw"]] if scores.budget else []  # the criterion's own, beside the budgeted choice
    wanted = sorted({0, scores.selected, *scores.points.values(), *raw})
    reported = None
    if thresholds or full_sweep or every_step:
        correct = _consecutive(engine, order, clean, thresholds, wanted[-1], every_step or full_sweep, batch_size,
                               progress)
        reported = last_step(correct, len(clean), thresholds, wanted[-1], full_sweep)
        if not every_step:
            correct = correct[: reported + 1]
        evaluated = list(range(len(correct)))
    else:
        evaluated = wanted
        correct = engine.counts(clean, order, evaluated, batch_size, progress, "sweep clean")
    poisoned_correct = None
    if poisoned is not None:
        poisoned_correct = engine.counts(poisoned, order, evaluated, batch_size, progress, "sweep poisoned")
    return sweep_outcome(scores, evaluated, correct, poisoned_correct, len(clean),
                         None if poisoned is None else len(poisoned), thresholds, full_sweep, reported,
                         engine.masked_at)


def _score(model: nn.Module, criterion: Criterion, clean: ImageData, batch_size: int, cache_bytes: int,
           progress: bool, tf32: bool) -> tuple[ChannelScores | None, SplitEngine | None]:
    """The criterion's scores, and the split engine when it already ran the prefix for them.

    A criterion that ranks one layer's channels by another layer's outputs (``layers`` and
    ``scores_from``, as :class:`~bdpruning.criteria.activation.MeanActivation`) is fed the
    split engine's prefix outputs when the split is at its rank layer; they stay for the sweep."""
    if not hasattr(criterion, "scores_from"):
        return criterion.score(model, clean), None
    start = time.perf_counter()
    layer, rank_layer = criterion.layers(model, clean)
    engine = choose_engine(model, [(layer, 0)], rank_layer, tf32)
    if engine.masked_at != rank_layer:
        return criterion.score(model, clean), engine
    means = engine.means_and_cache(clean, batch_size, cache_bytes, progress)
    return criterion.scores_from(means.ranking(rank_layer), layer, clean, time.perf_counter() - start), engine


@runs_in_precision_context
def sweep_criterion(
    model: nn.Module, criterion: Criterion, clean: DataLike, poisoned: DataLike | None = None, *,
    thresholds: Sequence[float] = (), full_sweep: bool = False, every_step: bool = False, batch_size: int = 1024,
    cache_bytes: int = 1 << 30, progress: bool = False, tf32: bool = False, max_accuracy_drop: float | None = None,
) -> DefenseResult | None:
    """Score ``model``'s channels with ``criterion`` on ``clean`` (it never sees ``poisoned``),
    then :func:`sweep_scores` them. ``model`` is left unchanged. Returns None in the extra
    processes of a ``ddp`` launch of a training criterion. ``cache_bytes`` bounds the prefix
    outputs the split engine keeps between ranking and sweeping the clean set; ``max_accuracy_drop``
    as :func:`sweep_scores`."""
    check_thresholds(thresholds, required=False)
    clean, poisoned = _adapted(model, clean, poisoned)
    model.eval()
    if max_accuracy_drop is not None:
        check_held_out(criterion, clean)
    scores, engine = _score(model, criterion, clean, batch_size, cache_bytes, progress, tf32)
    if scores is None:
        return None
    if scores.selected or scores.points:  # the lab's ranking alone chooses nothing: thresholds do
        log.info("%s chose %d of %d channels", scores.criterion, scores.selected, len(scores.order))
    if engine is None or scores.keep_shift:
        engine = choose_engine(model, scores.order, tf32=tf32, keep_shift=scores.keep_shift)
    if max_accuracy_drop is not None:
        scores = apply_budget(engine, scores, clean, max_accuracy_drop, batch_size=batch_size, progress=progress)
    return _sweep(model, scores, clean, poisoned, thresholds, full_sweep, every_step, batch_size, progress, engine)


#: Old names, kept for one release.
run_defense = sweep_criterion
defense_sweep = sweep_scores
