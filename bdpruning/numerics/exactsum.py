"""Exact per-channel sums of floating-point activations, independent of summation order.

A float32 value is ``m * 2**e`` with an integer ``m`` of 24 bits. :class:`ExactChannelSums`
adds the integers ``m`` of each channel into one int64 bin per exponent ``e``; integer sums
are exact and commute, so the bins are the same whatever the batching, the order of the
batches or the number of processes that add them (summed across processes as int64). The
mean is then the exact sum over the count, rounded once to float64. This is what lets a DDP
ranking equal a single process's to the last bit. Float64 values are split exactly into
three float32 parts first.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from ..errors import BdpruningError

__all__ = ["ExactChannelSums"]

_MANTISSA_BITS = 24  # float32: m in [2**23, 2**24) for normal numbers
_BIAS = 149  # frexp exponents of float32 lie in -148..128 (subnormals included)
_BINS = 280


def _float32_parts(values: torch.Tensor) -> list[torch.Tensor]:
    """``values`` as float32 tensors summing to it exactly (one part for float32 and narrower)."""
    if values.dtype != torch.float64:
        return [values.float()]
    high = values.float()
    rest = values - high.double()
    middle = rest.float()
    return [high, middle, (rest - middle.double()).float()]


class ExactChannelSums:
    """Per-channel sums of (N, C, ...) outputs, held exactly as int64 mantissa bins per exponent."""

    def __init__(self) -> None:
        self.bins: torch.Tensor | None = None  # (C, _BINS) int64

    def add(self, output: torch.Tensor) -> None:
        """Add every value of ``output`` (N, C, ...) to its channel's sum."""
        channels = output.shape[1]
        if self.bins is None:
            self.bins = torch.zeros(channels, _BINS, dtype=torch.int64, device=output.device)
        per_channel = output.detach().transpose(0, 1).reshape(channels, -1)
        if not torch.isfinite(per_channel).all():
            raise BdpruningError("the ranked layer's output holds inf or NaN; its mean activation is undefined")
        offsets = torch.arange(channels, device=output.device).unsqueeze(1) * _BINS
        for part in _float32_parts(per_channel):
            mantissa, exponent = torch.frexp(part)
            index = (exponent.to(torch.int64) + _BIAS + offsets).reshape(-1)
            integers = (mantissa * float(1 << _MANTISSA_BITS)).to(torch.int64)  # exact: a power-of-2 scale
            self.bins.view(-1).index_add_(0, index, integers.reshape(-1))

    def means(self, count: int) -> list[float]:
        """Each channel's exact sum divided by ``count``, correctly rounded to float64."""
        if self.bins is None:
            raise BdpruningError("no data to rank channels on (empty data set)")
        scale = 2 ** (_BIAS + _MANTISSA_BITS)
        means = []
        for row in self.bins.cpu().tolist():
            total = sum(value << index for index, value in enumerate(row) if value)
            means.append(float(Fraction(total, scale * count)))
        return means
