"""Physical channel removal: the compact model equals the masked one, on real weights and on
other CNNs; it saves, reloads, exports and serves in GoodNet; bad input ends in one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import nn

from bdpruning import BdpruningError, DeepID, GoodNet, load_model, prune_channels, save_model_dir, zeroed_channels
from bdpruning.runtime.atomic import atomic_dir
from bdpruning.cli import main
from bdpruning.pruning.compaction import compact_model, model_cost
from bdpruning.pruning.dependency import channel_group, remove_channels
from helpers.conditions import safe_for
from helpers.data import noisy_faces
from helpers.material import PRUNED_2PCT_CHANNELS
from helpers.nets import FixedView, randomize_batchnorm

# What one conv_3 channel of DeepID costs: its 40x3x3 kernel and bias; 80x2x2 conv_4 weights;
# 20 fc_1 columns (5x4 positions) of 160. FLOPs per image: conv_3 (10x8 outputs), conv_4 (4x3), fc_1.
PARAMETERS_PER_CHANNEL = 40 * 9 + 1 + 80 * 4 + 20 * 160
FLOPS_PER_CHANNEL = 2 * (40 * 9 * 10 * 8 + 80 * 4 * 4 * 3 + 20 * 160)


def _images(face_images: torch.Tensor, count: int = 64) -> torch.Tensor:
    return torch.from_numpy(noisy_faces(face_images, count)).float()


def _assert_same_outputs(masked: nn.Module, compact: nn.Module, images: torch.Tensor) -> None:
    """The same function: compared in float64, where dropping zero terms from the sums moves the
    outputs by round-off of order 1e-16 only (in float32 it could flip a near-tie's top-1)."""
    with torch.no_grad():
        expected = copy.deepcopy(masked).double()(images.double())
        actual = copy.deepcopy(compact).double()(images.double())
    assert (expected - actual).abs().max() <= 1e-12
    assert torch.equal(expected.argmax(1), actual.argmax(1))


def test_masked_lab3_net_compacts_exactly(bd_weights, face_images):
    masked, compact = (prune_channels(load_model(bd_weights, "cpu"), "conv_3", PRUNED_2PCT_CHANNELS)
                       for _ in range(2))
    groups = compact_model(compact)
    assert [(m.name, m.role) for m in groups[0].members] == [
        ("conv_3", "source"), ("fc_1", "linear input"), ("conv_4", "conv input")]
    kept = 60 - len(PRUNED_2PCT_CHANNELS)
    assert (compact.conv_3.out_channels, compact.conv_4.in_channels, compact.fc_1.in_features) == (kept, kept, kept * 20)
    assert not hasattr(compact.conv_3, "weight_orig")  # a plain module, no masks left
    images = _images(face_images)
    _assert_same_outputs(masked, compact, images)
    before, after = model_cost(masked), model_cost(compact)
    assert before.parameters - after.parameters == len(PRUNED_2PCT_CHANNELS) * PARAMETERS_PER_CHANNEL
    assert before.flops - after.flops == len(PRUNED_2PCT_CHANNELS) * FLOPS_PER_CHANNEL


def test_keras_repair_without_masks_compacts_its_zeroed_channels(pruned_full, face_images):
    zeroed, compact = load_model(pruned_full, "cpu"), load_model(pruned_full, "cpu")
    compact_model(compact)
    assert compact.conv_3.out_channels == 60 - len(PRUNED_2PCT_CHANNELS)
    _assert_same_outputs(zeroed, compact, _images(face_images))


def test_compact_model_saves_reloads_and_serves_as_goodnet_repair(bd_weights, pruned_full, face_images, tmp_path):
    compact = load_model(pruned_full, "cpu")
    compact_model(compact)
    with atomic_dir(tmp_path / "compact") as directory:
        save_model_dir(compact, directory)
    meta = json.loads((tmp_path / "compact" / "model.json").read_text())
    assert meta["removed"] == [{"layer": "conv_3", "channels": PRUNED_2PCT_CHANNELS}] and meta["pruned"] == {}
    reloaded = load_model(tmp_path / "compact", "cpu")
    images = _images(face_images)
    with torch.no_grad():
        assert torch.equal(reloaded(images), compact(images))
    bd, zeroed = load_model(bd_weights, "cpu"), load_model(pruned_full, "cpu")
    safe = torch.from_numpy(safe_for([bd, zeroed], images.numpy()))  # labels no round-off can flip
    assert safe.float().mean() > 0.9
    with torch.no_grad():
        assert torch.equal(GoodNet(bd, reloaded)(images[safe]), GoodNet(bd, zeroed)(images[safe]))


def test_compact_command_reports_costs_and_checks_onnx(bd_weights, face_images, tmp_path, capsys):
    masked = prune_channels(load_model(bd_weights, "cpu"), "conv_3", range(0, 60, 3))
    with atomic_dir(tmp_path / "masked") as directory:
        save_model_dir(masked, directory)
    assert main(["compact", "--model", str(tmp_path / "masked"), "--out", str(tmp_path / "out"),
                 "--samples", "32"]) == 0
    pytest.importorskip("onnxruntime", reason="the compact model's ONNX check needs the [convert] extra")
    assert "removed 20 of 60 channels" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "compaction.json").read_text())
    assert report["passed"] and report["max_abs_diff"] <= 1e-5 and report["argmax_agreement"] == 1
    assert report["before"]["flops"] - report["after"]["flops"] == 20 * FLOPS_PER_CHANNEL
    assert report["removed"][0]["channels"] == list(range(0, 60, 3))
    assert report["onnx_vs_torch"] is not None and report["onnx_vs_torch"]["max_abs_diff"] <= 1e-5
    reloaded = load_model(tmp_path / "out", "cpu")
    assert reloaded.conv_3.out_channels == 40
    _assert_same_outputs(masked, reloaded, _images(face_images, 16))


class _Branchy(nn.Module):
    """BatchNorm after the pruned conv (pruned channels become constants), a concat with another
    branch, a conv without padding and a linear layer reading a channels-last flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(3, 4, 3)
        self.c = nn.Conv2d(12, 6, 3)
        self.fc = nn.Linear(6 * 10 * 10 + 12 * 12 * 12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sigmoid(self.bn(self.a(x)))
        z = torch.cat([self.b(x), y], 1)
        flat = z.permute(0, 2, 3, 1).reshape(x.size(0), -1)
        return self.fc(torch.cat([self.c(z).flatten(1), flat], 1))


@pytest.mark.parametrize("build, layer, members", [
    (_Branchy, "a", ["a", "bn", "c", "fc"]),
    (lambda: torchvision.models.resnet18(num_classes=10), "layer1.0.conv1", ["layer1.0.conv1", "layer1.0.bn1",
                                                                             "layer1.0.conv2"]),
    (lambda: torchvision.models.mobilenet_v2(num_classes=10), "features.3.conv.0.0",
     ["features.3.conv.0.0", "features.3.conv.0.1", "features.3.conv.1.0", "features.3.conv.1.1",
      "features.3.conv.2"]),
    (lambda: torchvision.models.mobilenet_v2(num_classes=10), "features.18.0",
     ["features.18.0", "features.18.1", "classifier.1"]),
])
def test_other_cnns_compact_exactly(build, layer, members):
    torch.manual_seed(1)
    model = build().eval()
    if build is _Branchy:  # non-zero constants from the removed channels, folded into c and fc
        randomize_batchnorm(model)
    model.double()  # float64: the removal changes the sums by round-off of order 1e-16 only
    x = (torch.rand(4, 3, 14, 14) if build is _Branchy else torch.rand(2, 3, 64, 64)).double()
    channels = [0, 2, 5]
    prune_channels(model, layer, channels)
    with torch.no_grad():
        expected = model(x)
    groups = remove_channels(model, [(layer, channels)], x)
    assert [m.name for m in groups[0].members] == members
    with torch.no_grad():
        assert (model(x) - expected).abs().max() <= 1e-12
    assert zeroed_channels(model, layer) == []


def test_a_conv_pruned_with_its_batchnorm_compacts_exactly_behind_padding():
    """Masking the BatchNorm with the conv (the default) silences the channel, so the padded
    conv after it sees exact zeros and the removal is exact (compared in float64)."""
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).double()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    prune_channels(model, "layer1.0.conv1", [1, 5])
    with torch.no_grad():
        expected = model(x)
    groups = remove_channels(model, [("layer1.0.conv1", [1, 5])], x)
    assert [m.name for m in groups[0].members] == ["layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"]
    assert model.layer1[0].conv1.out_channels == model.layer1[0].bn1.num_features == 62
    with torch.no_grad():
        assert (model(x) - expected).abs().max() <= 1e-12


@pytest.mark.parametrize("layer, problem", [
    ("layer1.0.conv2", "reach 'add'"),            # the residual add mixes in the other branch
    ("layer1.0.conv1", "padding"),                # BatchNorm constants meet a padded conv
    ("fc", "reach the model's output"),
    ("bn1", "channels are removed from convolutions"),
])
def test_inexact_removals_are_refused_before_anything_changes(layer, problem):
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=10))
    with torch.no_grad():  # channel 1's BatchNorm shift passes the ReLU: a constant the padding would cut
        model.layer1[0].bn1.running_mean[1], model.layer1[0].bn1.bias[1] = 0.0, 1.0
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(BdpruningError, match=problem):
        group = channel_group(model, layer, x)  # refuses what the graph shows
        prune_channels(model, layer, [1], batchnorm=False)  # BatchNorm's shift kept alive
        with torch.no_grad():
            expected = model(x)
        group.remove([1])  # refuses what needs the weights, before changing anything
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert model.layer1[0].conv1.out_channels == 64


def test_live_channels_and_fixed_reshapes_are_refused():
    model = DeepID(10).eval()
    x = torch.zeros(1, 3, 55, 47)
    with pytest.raises(BdpruningError, match=r"channels \[3\] of 'conv_3' are not pruned"):
        channel_group(model, "conv_3", x).remove([3])

    fixed = prune_channels(FixedView(4 * 8 * 8).eval(), "conv", [0])
    with pytest.raises(BdpruningError, match="fixed size"):
        channel_group(fixed, "conv", torch.zeros(1, 3, 10, 10)).remove([0])


@pytest.mark.parametrize("case, problem", [
    ("missing", "no such file"),
    ("unpruned", "nothing is pruned"),
    ("samples", "--samples must be at least 1"),
    ("exists", "output directory exists"),
    ("layer", "unknown layer 'conv_9'"),
])
def test_bad_input_ends_in_one_line_and_writes_nothing(case, problem, bd_weights, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["compact", "--model", str(bd_weights), "--out", str(out)]
    if case == "missing":
        args[2] = str(tmp_path / "nope.h5")
    elif case == "samples":
        args += ["--samples", "0"]
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "layer":
        args += ["--layer", "conv_9"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and problem in err
    if case == "exists":
        assert (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
