"""Exact per-channel sums: independent of batching and order, equal to the rational mean."""

from __future__ import annotations


import pytest
import torch

import bdpruning


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_channel_sums_do_not_depend_on_batching_or_order(dtype):
    from fractions import Fraction

    from bdpruning.numerics.exactsum import ExactChannelSums

    generator = torch.Generator().manual_seed(0)
    values = torch.randn(37, 3, 4, 5, generator=generator, dtype=dtype) * 10.0 ** torch.randint(
        -30, 30, (37, 3, 4, 5), generator=generator).to(dtype)
    values[0, 0, 0, 0] = 0.0
    whole = ExactChannelSums()
    whole.add(values)
    pieces = ExactChannelSums()
    for chunk in torch.randperm(37, generator=generator).split(5):
        pieces.add(values[chunk])
    assert torch.equal(whole.bins, pieces.bins)
    exact = [sum(Fraction(v) for v in values[:, c].reshape(-1).tolist()) / values[:, c].numel() for c in range(3)]
    assert whole.means(values[:, 0].numel()) == [float(m) for m in exact]
    with pytest.raises(bdpruning.BdpruningError, match="inf or NaN"):
        ExactChannelSums().add(torch.full((1, 2, 1, 1), float("nan")))
