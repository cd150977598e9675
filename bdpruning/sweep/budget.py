"""A clean-accuracy budget on a criterion's own choice: the defender never gets back a model
that lost more than ``max_drop`` points of clean accuracy.

A criterion's order *is* its own order of choices: pruning the first ``k`` channels is what
CLP prunes for some ``u`` (``u`` from high to low) and what a mask criterion prunes for some
threshold (from low to high). The budget walks ``k`` from 0 up to the criterion's own choice
and keeps the most-pruned ``k`` whose accuracy drop is at most ``max_drop`` points, judged on
the clean images the criterion did not learn from (ANP and RNP learn on a seeded subset; CLP on
none). The drop is compared on integer counts, so a drop of exactly ``max_drop`` is within it::

    scores = apply_budget(engine, scores, clean, max_drop=5.0)
    scores.selected            # the budgeted choice
    scores.budget              # {"max_drop": 5.0, "raw": ..., "step": ..., "held_out": ..., ...}
"""

from __future__ import annotations

import dataclasses
import logging
from fractions import Fraction

from torch.utils.data import Subset

from ..criteria.base import ChannelScores
from ..data.forms import ImageData, as_image_data
from ..errors import BdpruningError

__all__ = ["DEFAULT_MAX_DROP", "apply_budget", "check_held_out", "held_out_split", "within_budget"]

log = logging.getLogger(__name__)

#: The default budget, in points of clean accuracy.
DEFAULT_MAX_DROP = 5.0


def held_out_split(clean: ImageData, scores: ChannelScores) -> ImageData:
    """The clean images ``scores``' criterion did not learn from (all of them for a data-free one)."""
    if scores.trained_on is None:
        raise BdpruningError(f"{scores.criterion} does not say which clean images it learned from: "
                             "the budget cannot be judged on images it did not see")
    if not scores.trained_on:
        return clean
    seen = set(scores.trained_on)
    held = [i for i in range(len(clean)) if i not in seen]
    if not held:
        raise BdpruningError(f"{scores.criterion} learned from all {len(clean)} clean images: the budget needs "
                             "clean images it did not see (learn on fewer, e.g. --images 500)")
    return as_image_data(Subset(clean.as_dataset(), held))


def check_held_out(criterion: object, clean: ImageData) -> None:
    """Before a learned criterion trains: refuse a run that would leave no clean image unseen
    for the budget (its ``images`` is None or at least the clean set's size)."""
    if not hasattr(criterion, "images"):
        return
    criterion.validate()  # a bad setting is named first
    images = getattr(criterion, "images")
    if images is None or images >= len(clean):
        raise BdpruningError(f"{getattr(criterion, 'name', 'the criterion')} would learn from all {len(clean)} "
                             "clean images, leaving none to judge the accuracy budget on: learn on fewer "
                             f"(--images, e.g. {max(1, len(clean) * 3 // 5)}) or give no budget")


def within_budget(correct: list[int], total: int, max_drop: float) -> int:
    """The largest step ``k`` (an index of ``correct``, counts from step 0) whose drop from step
    0 is at most ``max_drop`` points."""
    limit = Fraction(str(max_drop)) * total
    return max(k for k, count in enumerate(correct) if (correct[0] - count) * 100 <= limit)


def apply_budget(engine, scores: ChannelScores, clean: ImageData, max_drop: float, *, batch_size: int = 1024,
                 progress: bool = False) -> ChannelScores:
    """``scores`` with its choice capped by the budget (``selected`` the budgeted step; the
    criterion's own choice and the held-out drops in ``budget``). ``engine`` counts correct
    labels along the order (:mod:`bdpruning.sweep.loop`'s engines)."""
    if not max_drop >= 0:
        raise BdpruningError(f"the accuracy-drop budget must be a number of points >= 0 (got {max_drop})")
    raw = scores.selected
    held = held_out_split(clean, scores)
    correct = engine.counts(held, scores.order, range(raw + 1), batch_size, progress, "budget")
    step = within_budget(correct, len(held), max_drop)
    drop = lambda k: 100.0 * (correct[0] - correct[k]) / len(held)  # noqa: E731
    budget = {"max_drop": max_drop, "raw": raw, "step": step, "held_out": len(held),
              "held_out_accuracy": 100.0 * correct[0] / len(held), "held_out_drop": drop(step),
              "raw_held_out_drop": drop(raw)}
    if step < raw:
        log.warning("%s: its own choice (%d channels) costs %.1f points on %d held-out clean images; the budget of "
                    "%g points keeps %d", scores.criterion, raw, drop(raw), len(held), max_drop, step)
    return dataclasses.replace(scores, selected=step, budget=budget)
