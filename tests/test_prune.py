"""The pruning defense: exact fast sweep, thresholds, repaired models, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import bdpruning
from bdpruning import BdpruningError
from bdpruning.criteria.activation_means import rank_channels
from bdpruning.runtime.atomic import atomic_dir
from bdpruning.cli import main
from bdpruning.models import ModelInfo, attach_info
from bdpruning.evaluation.predict import predict_labels
from bdpruning.numerics.roundoff import float64_reference
from bdpruning.sweep.lab import find_thresholds, naive_sweep_predictions, run_sweep, sweep_predictions
from conftest import CLEAN_IMAGE, POISONED_IMAGE, write_h5_set


def _faces(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy copies of the two real face crops (clean -> 860, sunglasses -> 0)."""
    from PIL import Image

    base = [np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p in (CLEAN_IMAGE, POISONED_IMAGE)]
    rng = np.random.default_rng(seed)
    stack = np.stack([base[i % 2] for i in range(n)]).astype(np.int16)
    data = np.clip(stack + rng.integers(-40, 40, stack.shape), 0, 255).astype(np.uint8)
    return data, np.where(np.arange(n) % 2 == 0, 860, 0)


@pytest.fixture(scope="module")
def face_set(tmp_path_factory):
    if not (CLEAN_IMAGE.exists() and POISONED_IMAGE.exists()):
        pytest.skip("../shared/images is absent (CI has it)")
    data, labels = _faces(120, seed=0)
    return write_h5_set(tmp_path_factory.mktemp("faces") / "faces.h5", data, labels)


class SkipNet(nn.Module):
    """A small non-DeepID CNN: BatchNorm after the pruned conv and a skip connection around it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x / 64 - 2))
        x = torch.relu(self.bn(self.block(x)) + x)
        return self.head(torch.flatten(self.pool(x), 1)).softmax(dim=1)


def _random_set(tmp_path, n=37, classes=5, seed=1):
    rng = np.random.default_rng(seed)  # a random colour per image plus noise
    data = (rng.integers(0, 256, (n, 3, 1, 1)) * 0.8 + rng.integers(0, 50, (n, 3, 55, 47))).astype(np.uint8)
    return bdpruning.read_h5_dataset(write_h5_set(tmp_path / "r.h5", data, rng.integers(0, classes, n)))


def _assert_same_sweeps(fast: torch.Tensor, naive: torch.Tensor) -> None:
    assert fast.shape == naive.shape and torch.equal(fast, naive)


def test_fast_sweep_equals_naive_sweep_on_deepid(bd_weights, face_set, tmp_path):
    """In float64, so that equality is not left to round-off: the fast sweep computes each step
    on other batches than a plain forward does, which in float32 may flip a near-tie."""
    model = bdpruning.load_model(bd_weights, device="cpu").double()
    whole = bdpruning.read_h5_dataset(face_set, 1283)
    images = whole.read(0, 48).numpy().astype(np.uint8)
    data = bdpruning.read_h5_dataset(write_h5_set(tmp_path / "48.h5", images, whole.labels[:48].numpy()), 1283)
    order = rank_channels(model, data, "pool_3").order
    fast = sweep_predictions(model, data, order, "conv_3", "pool_3", batch_size=20)
    _assert_same_sweeps(fast, naive_sweep_predictions(model, data, order, "conv_3"))
    assert fast.shape == (61, 48) and (fast[-1] != fast[0]).any()  # the sweep does change predictions


def test_fast_sweep_equals_naive_sweep_on_another_architecture(tmp_path):
    torch.manual_seed(0)
    model = SkipNet().eval().double()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2)
    data = _random_set(tmp_path)
    order = rank_channels(model, data, "block").order
    fast = sweep_predictions(model, data, order, "block", "bn", batch_size=16)
    _assert_same_sweeps(fast, naive_sweep_predictions(model, data, order, "block"))
    assert (fast[-1] != fast[0]).any()


def test_thresholds_first_step_rule_double_crossing_and_exact_drop():
    # 200 images; accuracy 100, 99, 96.5, 98, 90: one step (2) crosses 2 and 3 points at once,
    # the rebound at step 3 does not matter, 4 points is reached exactly at step 4 of 5.
    correct = [200, 198, 193, 196, 192, 180]
    assert find_thresholds(correct, 200, [2, 3, 4, 10, 50]) == [2, 2, 4, 5, None]


def test_sweep_reports_results_and_saves_repaired_models(bd_weights, face_set, tmp_path):
    out = tmp_path / "run"
    code = main(["prune", "--model", str(bd_weights), "--clean-valid", str(face_set), "--poisoned-valid",
                 str(face_set), "--out", str(out), "--thresholds", "2", "4", "10", "99", "--no-progress"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    sweep = json.loads((out / "sweep.json").read_text())
    order = [r["channel"] for r in sweep["ranking"]]
    means = [r["mean_activation"] for r in sweep["ranking"]]
    assert means == sorted(means) and len(order) == 60
    hits = {t["threshold"]: t for t in summary["thresholds"]}
    assert not hits[99]["reached"] and not (out / "repaired_99pct").exists()
    model = None
    for threshold in (2, 4, 10):
        hit = hits[threshold]
        assert hit["reached"] and hit["accuracy_drop"] >= threshold
        repaired = bdpruning.load_model(out / hit["model_dir"], device="cpu")
        # the zeroed channels are exactly the ones the ranking put first
        assert bdpruning.pruned_channels(repaired, "conv_3") == sorted(order[: hit["channels_pruned"]])
        keras_copy = bdpruning.load_model(out / hit["model_dir"] / "model.h5", device="cpu")
        assert bdpruning.pruned_channels(keras_copy, "conv_3") == sorted(order[: hit["channels_pruned"]])
        # a plain forward of the saved model reproduces the recorded accuracy, up to the images
        # whose float64 margin is within round-off (none, on most machines)
        data = bdpruning.read_h5_dataset(face_set, 1283)
        unsafe = int((~float64_reference(repaired, data.read(0, len(data)).numpy()).safe).sum())
        accuracy = 100 * (predict_labels(repaired, data) == data.labels).double().mean().item()
        assert abs(accuracy - hit["clean_accuracy"]) <= 100 * unsafe / len(data) + 1e-9
        model = repaired
    rows = (out / "sweep.csv").read_text().splitlines()
    assert rows[0] == "step,channel,fraction_pruned,clean_accuracy,attack_success_rate,accuracy_drop"
    assert len(rows) == 1 + 61  # threshold 99 is never reached, so the sweep went to the end
    assert (out / "accuracy_asr.png").stat().st_size > 0 and (out / "activations.png").stat().st_size > 0
    # pruned pool_3 channels are exactly zero in a forward pass
    seen = {}
    model.pool_3.register_forward_hook(lambda m, i, o: seen.setdefault("pool_3", o))
    model(torch.rand(4, 3, 55, 47) * 255)
    zeroed = hits[10]["pruned_channels"]
    assert torch.all(seen["pool_3"][:, zeroed] == 0)


def test_one_step_can_cross_two_thresholds(bd_weights, face_set):
    model = bdpruning.load_model(bd_weights, device="cpu")
    data = bdpruning.read_h5_dataset(face_set, 1283)
    accuracy = [s.clean_accuracy for s in run_sweep(model, data, thresholds=(100,)).all_steps]
    drops = [accuracy[0] - a for a in accuracy]
    # the first step whose drop jumps by two images or more past every earlier drop
    step = next(k for k in range(2, len(drops)) if drops[k] - max(drops[1:k]) >= 2 * 100 / len(data) - 1e-9)
    low, high = max(drops[1:step]) + 50 / len(data), drops[step]
    result = run_sweep(model, data, thresholds=(low, high))
    assert [hit.step for hit in result.thresholds] == [step, step]
    assert len(result.steps) == step + 1  # the sweep stops at the last threshold


def test_masks_survive_training_steps_and_reload(bd_weights, tmp_path):
    model = bdpruning.load_model(bd_weights, device="cpu")
    bdpruning.prune_channels(model, "conv_3", [1, 2])
    bdpruning.prune_channels(model, "conv_3", [7])  # masks accumulate
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    images = torch.rand(2, 3, 55, 47) * 255
    loss = model(images).sum()
    loss.backward()
    optimizer.step()
    assert bdpruning.pruned_channels(model, "conv_3") == [1, 2, 7]
    with atomic_dir(tmp_path / "trained") as directory:
        bdpruning.save_model_dir(model, directory)
    reloaded = bdpruning.load_model(tmp_path / "trained", device="cpu")
    assert bdpruning.pruned_channels(reloaded, "conv_3") == [1, 2, 7]
    seen = {}
    reloaded.pool_3.register_forward_hook(lambda m, i, o: seen.setdefault("pool_3", o))
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))
    assert torch.all(seen["pool_3"][:, [1, 2, 7]] == 0)
    # the reloaded masks still hold the channels at zero under training
    optimizer = torch.optim.SGD(reloaded.parameters(), lr=1e-3)
    reloaded(images).sum().backward()
    optimizer.step()
    assert bdpruning.pruned_channels(reloaded, "conv_3") == [1, 2, 7]


def test_generic_models_prune_through_the_sweep(tmp_path):
    torch.manual_seed(0)
    model = attach_info(SkipNet().eval(), ModelInfo("custom", 5, (3, 55, 47), "test"))
    data = _random_set(tmp_path)
    result = run_sweep(model, data, layer="block", rank_layer="bn", thresholds=(1,), full_sweep=True)
    assert result.masked_at == "bn" and len(result.steps) == 9  # its BatchNorm is masked with the conv


@pytest.mark.parametrize(
    "extra,problem",
    [
        (["--layer", "conv_9"], "unknown layer 'conv_9'; valid layer names: conv_1"),
        (["--rank-layer", "pool_2"], "rank layer 'pool_2' is upstream of the pruned layer 'conv_3'"),
        (["--rank-layer", "conv_4"], "rank layer 'conv_4' has 80 channels but 'conv_3' has 60"),
    ],
)
def test_bad_layers_are_named(bd_weights, face_set, tmp_path, capsys, extra, problem):
    out = tmp_path / "out"
    code = main(["prune", "--model", str(bd_weights), "--clean-valid", str(face_set), "--out", str(out), *extra])
    assert code == 2 and problem in capsys.readouterr().err and not out.exists()


def test_bad_thresholds_are_refused(bd_weights, face_set, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--model", str(bd_weights), "--clean-valid", str(face_set), "--out", str(tmp_path / "o"),
              "--thresholds", "-2"])
    assert exit_info.value.code == 2 and "positive numbers" in capsys.readouterr().err
    with pytest.raises(BdpruningError, match="positive"):
        run_sweep(bdpruning.DeepID(3), None, thresholds=(0,))


def test_bad_data_and_existing_output_are_refused_without_damage(bd_weights, face_set, tmp_path, capsys):
    bad = write_h5_set(tmp_path / "bad.h5", np.zeros((3, 3, 55, 47), np.uint8), np.array([0, 1, 5000]))
    out = tmp_path / "out"
    assert main(["prune", "--model", str(bd_weights), "--clean-valid", str(bad), "--out", str(out)]) == 2
    assert "bad.h5: labels range 0..5000, outside the model's 1283 classes" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    assert main(["prune", "--model", str(bd_weights), "--clean-valid", str(face_set), "--out", str(out)]) == 2
    assert "output directory exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "earlier results"


def test_sweep_without_room_to_cache_recomputes_the_same_results(bd_weights, face_set):
    model = bdpruning.load_model(bd_weights, device="cpu")
    data = bdpruning.read_h5_dataset(face_set, 1283)
    cached = run_sweep(model, data, data, batch_size=50, full_sweep=True)
    streamed = run_sweep(model, data, data, batch_size=50, full_sweep=True, cache_bytes=0)
    assert streamed.all_steps == cached.all_steps and streamed.ranking == cached.ranking
