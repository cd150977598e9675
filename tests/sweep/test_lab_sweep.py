"""The pruning defense: exact fast sweep, thresholds, repaired models, bad input."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

import bdpruning
from bdpruning import BdpruningError
from bdpruning.cli import main
from bdpruning.models import ModelInfo, attach_info
from bdpruning.evaluation.predict import predict_labels
from bdpruning.numerics.roundoff import float64_reference
from bdpruning.sweep.lab import find_thresholds, run_sweep
from helpers.data import random_colour_set, write_h5_set
from helpers.nets import SkipNet


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
        assert bdpruning.zeroed_channels(repaired, "conv_3") == sorted(order[: hit["channels_pruned"]])
        keras_copy = bdpruning.load_model(out / hit["model_dir"] / "model.h5", device="cpu")
        assert bdpruning.zeroed_channels(keras_copy, "conv_3") == sorted(order[: hit["channels_pruned"]])
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


def test_generic_models_prune_through_the_sweep(tmp_path):
    torch.manual_seed(0)
    model = attach_info(SkipNet().eval(), ModelInfo("custom", 5, (3, 55, 47), "test"))
    data = random_colour_set(tmp_path)
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




def test_a_model_and_data_that_do_not_fit_stop_before_the_sweep(bd_weights, face_set, tmp_path, capsys):
    """The real Lab-3 net on its faces with the labels shuffled over its 1283 classes: chance
    level on the first look at the clean set, so the run stops before sweeping, writing nothing."""
    rng = np.random.default_rng(0)
    with h5py.File(face_set, "r") as handle:
        data = handle["data"][()]
    shuffled = write_h5_set(tmp_path / "shuffled.h5", data, rng.integers(0, 1283, len(data)))
    out = tmp_path / "out"
    assert main(["prune", "--model", str(bd_weights), "--clean-valid", str(shuffled), "--out", str(out),
                 "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert f"(its first {len(data)} images): clean accuracy" in error and "chance level for 1283 classes" in error
    assert not out.exists()
