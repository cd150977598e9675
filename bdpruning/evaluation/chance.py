"""A baseline at chance level: the model and the data do not fit, and a run on them means nothing."""

from __future__ import annotations

import math

from ..errors import BdpruningError

__all__ = ["check_not_chance"]

#: How many binomial standard deviations above chance a baseline must lie.
SIGMAS = 3.0


def check_not_chance(correct: int, images: int, num_classes: int, where: str = "baseline") -> None:
    """Refuse (one line, naming the likely causes) a clean accuracy that is not above guessing.

    ``correct`` of ``images`` clean images right over ``num_classes`` classes is chance level
    when it lies less than :data:`SIGMAS` binomial standard deviations above ``images /
    num_classes``: a model that learnt anything is far above it; a model given data in another
    scale, channel order or labelling is at it.
    """
    if images <= 0 or num_classes < 2:
        return
    p = 1.0 / num_classes
    expected = images * p
    if correct - expected < SIGMAS * math.sqrt(images * p * (1 - p)):
        raise BdpruningError(
            f"{where}: clean accuracy {100 * correct / images:.2f} % ({correct} of {images}) is chance level for "
            f"{num_classes} classes; the model and the data do not fit: check the input scale (0..255 vs 0..1, "
            "--input-range), the channel order (RGB vs BGR, NCHW) and the labels (an untrained model on purpose: "
            "--allow-chance-baseline)")
