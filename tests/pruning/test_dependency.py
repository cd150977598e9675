"""Channel dependencies (bdpruning.pruning.dependency): which layers shrink with a layer's output
channels, which channel each of their inputs comes from, and removal that keeps the function.

Every removal is compared in float64 with the same model masked (channels pruned, not removed),
so equality is not left to round-off; the labels are compared with an independent computation of
where each flattened column comes from."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

from bdpruning import BdpruningError, prune_channels
from bdpruning.pruning.dependency import channel_group, remove_channels
from helpers.nets import FixedView, randomize_batchnorm


class Flattening(nn.Module):
    """conv (6 channels) -> ReLU -> MaxPool -> flatten in NCHW or NHWC order -> linear; and a
    second conv reading the same channels."""

    def __init__(self, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.conv = nn.Conv2d(3, 6, 3)
        self.pool = nn.MaxPool2d(2)
        self.side = nn.Conv2d(6, 2, 3)
        self.fc = nn.Linear(6 * 3 * 3 + 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(torch.relu(self.conv(x)))  # (N, 6, 3, 3) for an 8 x 8 input
        flat = y.permute(0, 2, 3, 1).flatten(1) if self.channels_last else y.flatten(1)
        side = self.side(y).flatten(1)  # (N, 2)
        return self.fc(torch.cat([flat, side], 1))


def _masked_and_removed(model: nn.Module, layer: str, channels: list[int], x: torch.Tensor, **masking):
    """(the masked model's output, the model after removal, its output), in float64."""
    model = model.double().eval()
    prune_channels(model, layer, channels, **masking)
    with torch.no_grad():
        expected = model(x)
    remove_channels(model, [(layer, channels)], x)
    with torch.no_grad():
        return expected, model, model(x)


@pytest.mark.parametrize("channels_last", [False, True])
def test_each_linear_column_is_labelled_with_the_channel_it_comes_from(channels_last):
    model = Flattening(channels_last).eval()
    group = channel_group(model, "conv", torch.zeros(1, 3, 8, 8))
    members = {m.name: m for m in group.members}
    assert [(m.name, m.role) for m in group.members] == [("conv", "source"), ("side", "conv input"),
                                                         ("fc", "linear input")]
    positions = torch.arange(6 * 9)  # independent: column j of the flatten, then the two side columns
    expected = positions % 6 if channels_last else positions // 9
    assert torch.equal(members["fc"].labels, torch.cat([expected, torch.tensor([-1, -1])]))
    assert torch.equal(members["side"].labels, torch.arange(6))
    assert group.describe() == [{"layer": "conv", "role": "source", "size": 6},
                                {"layer": "side", "role": "conv input", "size": 6},
                                {"layer": "fc", "role": "linear input", "size": 56}]


@pytest.mark.parametrize("channels_last", [False, True])
def test_removal_gives_the_masked_models_outputs_and_shrinks_every_member(channels_last):
    torch.manual_seed(0)
    x = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    expected, model, out = _masked_and_removed(Flattening(channels_last), "conv", [1, 4], x)
    assert (out - expected).abs().max() <= 1e-12  # float64 sums over fewer terms: round-off only
    assert (model.conv.out_channels, model.side.in_channels, model.fc.in_features) == (4, 4, 4 * 9 + 2)
    assert model.conv.weight.shape == (4, 3, 3, 3) and not hasattr(model.conv, "weight_orig")  # masks gone


def test_a_batchnorm_shift_is_folded_into_the_consumers_bias():
    """A pruned channel is a constant after its BatchNorm (the shift is kept with batchnorm=False):
    the constant's contribution moves into the next conv's (unpadded) and linear's biases."""

    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)
            self.next = nn.Conv2d(5, 3, 3, bias=False)  # no bias yet: removal gives it one
            self.fc = nn.Linear(3 * 4 * 4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.next(torch.sigmoid(self.bn(self.conv(x))))).flatten(1))

    torch.manual_seed(0)
    model = randomize_batchnorm(Shifted())
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    group = channel_group(model, "conv", x.float())
    assert [(m.name, m.role) for m in group.members] == [("conv", "source"), ("bn", "per-channel"),
                                                         ("next", "conv input")]
    expected, removed, out = _masked_and_removed(model, "conv", [0, 3], x, batchnorm=False)
    assert removed.next.bias is not None and removed.bn.num_features == 3
    assert (out - expected).abs().max() <= 1e-12


def test_without_folding_only_the_shapes_change():
    """fold=False rebuilds a saved compact model's shapes before its weights are loaded."""
    model = Flattening().double().eval()
    bias = model.side.bias.detach().clone()
    channel_group(model, "conv", torch.zeros(1, 3, 8, 8, dtype=torch.float64)).remove([2], fold=False)
    assert model.conv.out_channels == 5 and torch.equal(model.side.bias, bias)


def test_a_depthwise_conv_shrinks_with_its_input_and_a_grouped_one_is_refused():
    depthwise = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=6), nn.Conv2d(6, 2, 1),
                              nn.Flatten(), nn.LazyLinear(2))
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    depthwise(x.float())  # materialise the lazy layer
    group = channel_group(depthwise.eval(), "0", x[:1].float())
    assert [(m.name, m.role) for m in group.members] == [("0", "source"), ("2", "per-channel"), ("3", "conv input")]
    expected, model, out = _masked_and_removed(depthwise, "0", [0, 5], x)
    assert model[2].groups == model[2].in_channels == model[2].out_channels == 4
    assert (out - expected).abs().max() <= 1e-12
    grouped = nn.Sequential(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 3, groups=2)).eval()
    with pytest.raises(BdpruningError, match=r"channels of '0' reach '_1' \(call_module 1\)"):
        channel_group(grouped, "0", torch.zeros(1, 3, 6, 6))


def test_a_linear_layers_outputs_shrink_with_the_next_linear_inputs():
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Dropout(), nn.Linear(7, 3))
    x = torch.rand(6, 5, dtype=torch.float64)
    group = channel_group(model.eval(), "0", x.float())
    assert [(m.name, m.role) for m in group.members] == [("0", "source"), ("3", "linear input")]
    with torch.no_grad():
        model[0].weight[[2, 6]] = 0  # tanh(0) = 0: the channels carry nothing
        model[0].bias[[2, 6]] = 0
    model.double()
    with torch.no_grad():
        expected = model(x)
    remove_channels(model, [("0", [2, 6])], x)
    assert (model[0].out_features, model[3].in_features) == (5, 5)
    with torch.no_grad():
        assert (model(x) - expected).abs().max() <= 1e-12


def test_a_product_with_a_constant_matrix_loses_its_rows():
    """onnx2torch writes Keras Dense layers as MatMul + Add: the matrix is a graph constant."""

    class Product(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.matrix = nn.Parameter(torch.randn(4 * 2 * 2, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.matmul(torch.relu(self.conv(x)).flatten(1), self.matrix)

    torch.manual_seed(0)
    x = torch.rand(3, 3, 2, 2, dtype=torch.float64)
    group = channel_group(Product().eval(), "conv", x.float())
    assert [m.role for m in group.members] == ["source", "matmul input"] and group.members[1].matrix == "matrix"
    expected, model, out = _masked_and_removed(Product(), "conv", [1], x)
    assert model.matrix.shape == (12, 3) and isinstance(model.matrix, nn.Parameter)
    assert (out - expected).abs().max() <= 1e-12


def test_a_traced_graph_module_gets_its_fixed_reshape_resized():
    """A model that is its own fx graph (as onnx2torch's are) has its fixed-size reshape rewritten."""
    graph = fx.symbolic_trace(FixedView(4 * 2 * 2).eval())
    x = torch.rand(3, 3, 4, 4, dtype=torch.float64)
    expected, model, out = _masked_and_removed(graph, "conv", [0, 2], x)
    assert model.fc.in_features == 8 and (out - expected).abs().max() <= 1e-12


@pytest.mark.parametrize("forward, problem", [
    (lambda m, x: m.conv(x) + m.other(x), r"reach 'add'"),                  # another branch mixes in
    (lambda m, x: m.conv(x) * x.mean(), r"reach 'mul'"),                    # not a Python number
    (lambda m, x: torch.relu(m.conv(x)), "reach the model's output"),       # nothing consumes them
    (lambda m, x: m.conv(x).sum(dim=1), r"reach 'sum_1' \(call_method sum\)"),                    # an op bdpruning cannot follow
])
def test_channels_that_reach_what_cannot_shrink_are_refused_naming_it(forward, problem):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.other = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return forward(self, x)

    with pytest.raises(BdpruningError, match=problem):
        channel_group(Net().eval(), "conv", torch.zeros(1, 3, 4, 4))


def test_scaling_by_a_number_is_followed_and_the_removal_stays_exact():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 2), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.conv(x) * 0.5 - 1, 1), 1))

    x = torch.rand(3, 3, 5, 5, dtype=torch.float64)
    assert [m.name for m in channel_group(Scaled().eval(), "conv", x.float()).members] == ["conv", "fc"]
    expected, model, out = _masked_and_removed(Scaled(), "conv", [3], x)  # -1 per channel: folded into fc
    assert model.fc.in_features == 3 and (out - expected).abs().max() <= 1e-12


@pytest.mark.parametrize("channels, problem", [
    ([6], r"'conv' has 6 channels; cannot remove \[6\]"),
    ([0, 1, 2, 3, 4, 5], "cannot remove all 6 channels of 'conv'"),
])
def test_impossible_removals_are_refused_before_anything_changes(channels, problem):
    model = prune_channels(Flattening().eval(), "conv", list(range(6)))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BdpruningError, match=problem):
        channel_group(model, "conv", torch.zeros(1, 3, 8, 8)).remove(channels)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_what_a_group_cannot_start_from_is_refused():
    model = Flattening()
    with pytest.raises(BdpruningError, match="eval mode"):
        channel_group(model.train(), "conv", torch.zeros(1, 3, 8, 8))
    with pytest.raises(BdpruningError, match="'pool' is a MaxPool2d; channels are removed from convolutions"):
        channel_group(model.eval(), "pool", torch.zeros(1, 3, 8, 8))


def test_steps_use_the_layers_indices_at_their_turn_and_training_mode_comes_back():
    torch.manual_seed(0)
    model = Flattening().double().train()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    prune_channels(model, "conv", [1, 4])  # after removing 1, channel 4 is index 3
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.train()
    groups = remove_channels(model, [("conv", [1]), ("conv", [3])], x)
    assert model.training and [len(g.members[0].labels) for g in groups] == [6, 5]
    assert model.conv.out_channels == 4
    with torch.no_grad():
        assert (model.eval()(x) - expected).abs().max() <= 1e-12
