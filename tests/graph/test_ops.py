"""The one op taxonomy (bdpruning.graph.ops): what keeps channels apart and maps zero to zero,
as the split engine, the channel dependencies and the fused form all read it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from bdpruning.graph.ops import is_relu, maps_zero_to_zero, op_kind
from bdpruning.graph.split import zero_preserving_path


class Path(nn.Module):
    """conv -> ``op`` -> rank layer (a max pool)."""

    def __init__(self, op) -> None:
        super().__init__()
        self.conv, self.op, self.pool, self.head = nn.Conv2d(3, 4, 3), op, nn.AdaptiveMaxPool2d(1), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.op(self.conv(x))).flatten(1))


class Method(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.relu()


@pytest.mark.parametrize("op, zero_preserving", [
    (nn.ReLU(), True), (nn.GELU(), True), (nn.Tanh(), True), (nn.Dropout(), True), (Method(), True),
    (nn.AvgPool2d(1), True), (nn.Sigmoid(), False), (nn.Softplus(), False), (nn.BatchNorm2d(4), False),
])
def test_the_split_engine_follows_exactly_the_ops_that_map_zero_to_zero(op, zero_preserving):
    model = Path(op).eval()
    assert zero_preserving_path(model, "conv", "pool") is zero_preserving
    if not isinstance(op, nn.BatchNorm2d):  # an affine map: zero only with untrained statistics
        with torch.no_grad():  # the taxonomy's claim, checked on the op itself
            assert bool((op(torch.zeros(1, 4, 3, 3)) == 0).all()) is zero_preserving


def test_every_form_of_an_op_gets_one_kind():
    class Forms(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relu, self.bn, self.flat = nn.ReLU(), nn.BatchNorm1d(4), nn.Flatten()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = F.relu(self.relu(x)).relu()
            b = F.max_pool2d(a, 1).flatten(1) * 2
            return torch.matmul(self.bn(self.flat(a)[:, :4]), torch.ones(4, 2)) + b.size(0)

    gm = fx.symbolic_trace(Forms())
    kinds = {n.name: op_kind(gm, n) for n in gm.graph.nodes}
    assert [kinds[k] for k in ("relu", "relu_1", "relu_2", "max_pool2d", "flatten", "mul", "bn", "flat", "matmul",
                               "size")] == ["elementwise", "elementwise", "elementwise", "pool", "shape", "scalar",
                                            "norm", "shape", "matmul", "query"]
    assert kinds["getitem"] is None and kinds["x"] is None
    assert [n.name for n in gm.graph.nodes if is_relu(gm, n)] == ["relu", "relu_1", "relu_2"]
    assert not any(maps_zero_to_zero(gm, n) for n in gm.graph.nodes if n.name in ("bn", "mul", "flatten"))
