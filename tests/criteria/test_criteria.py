"""Pruning criteria (CLP, ANP, RNP) on a BadNet whose backdoor channel is planted by
construction, CLP's bounds against numpy, the learned masks, and the shared masked sweep."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch

import bdpruning
from bdpruning import BdpruningError
from bdpruning.criteria import ANP, CLP, RNP
from bdpruning.criteria.clp import clp_bounds
from bdpruning.sweep.defense import run_defense
from bdpruning.evaluation.predict import predict_labels
from helpers.cli import bdprune
from helpers.data import write_h5_set
from helpers.planted import BACKDOOR, planted_data, planted_net
from helpers.nets import half_batchnorm_net

CPU = {"accelerator": "cpu"}


@pytest.fixture(autouse=True)
def quiet_lightning():
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _criteria() -> dict:
    return {
        "clp": CLP(convs_without_batchnorm=True),  # the planted net has no BatchNorm
        "anp": ANP(iterations=20, images=128, batch_size=64, trainer_options=CPU),
        "rnp": RNP(images=128, batch_size=64, unlearn_epochs=3, recover_epochs=3, trainer_options=CPU),
    }


@pytest.mark.parametrize("name", ["clp", "anp", "rnp"])
def test_each_criterion_prunes_the_planted_backdoor_channel(name):
    clean, poisoned = planted_data(256, seed=0), planted_data(128, seed=1, poisoned=True)
    model = planted_net()
    before = copy.deepcopy(model.state_dict())
    result = run_defense(model, _criteria()[name], clean, poisoned)
    assert BACKDOOR in result.scores.selection().get("features", [])
    assert result.steps[0].attack_success_rate == 100 and result.chosen.attack_success_rate == 0
    assert result.chosen.clean_accuracy >= 90
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is unchanged
    record = result.scores.record()
    assert record["settings"] and record["seconds"] >= 0 and record["criterion"] == name


def test_clp_bounds_equal_an_independent_numpy_svd():
    model = half_batchnorm_net()
    bounds = clp_bounds(model)
    assert list(bounds) == ["conv_a", "conv_b"]
    for name, bn in (("conv_a", model.bn_a), ("conv_b", None)):
        weight = getattr(model, name).weight.detach().numpy().astype(np.float64)
        expected = np.array([np.linalg.svd(k.reshape(k.shape[0], -1), compute_uv=False)[0] for k in weight])
        if bn is not None:
            sigma = np.sqrt(bn.running_var.numpy().astype(np.float64) + bn.eps)
            expected *= np.abs(bn.weight.detach().numpy().astype(np.float64) / sigma)
        np.testing.assert_allclose(bounds[name].numpy(), expected, rtol=1e-9)


def test_clp_prunes_per_layer_above_mean_plus_u_std():
    scores = CLP(u=1.0, convs_without_batchnorm=True).score(half_batchnorm_net())
    for layer, bound in clp_bounds(half_batchnorm_net()).items():
        limit = bound.mean() + 1.0 * bound.std()
        assert scores.selection().get(layer, []) == [c for c in range(len(bound)) if bound[c] > limit]
    assert scores.points[1.0] == scores.selected and scores.settings["u"] == 1.0


@pytest.mark.parametrize("name", ["anp", "rnp"])
def test_learned_masks_lie_in_the_unit_interval_and_a_seed_repeats_them(name):
    clean = planted_data(128, seed=0)
    first = _criteria()[name].score(planted_net(), clean)
    second = _criteria()[name].score(planted_net(), clean)
    assert first.scores == second.scores  # bit for bit on CPU
    values = [v for layer in first.scores.values() for v in layer]
    assert all(0 <= v <= 1 for v in values)
    model = planted_net()
    for layer, channels in first.selection().items():
        bdpruning.prune_channels(model, layer, channels)
        assert bdpruning.zeroed_channels(model, layer) == channels  # exactly zero kernel and bias


@pytest.fixture
def deepid_files(tmp_path):
    torch.manual_seed(0)
    model = bdpruning.DeepID(5).eval()
    directory = tmp_path / "model"
    directory.mkdir()
    bdpruning.save_model_dir(model, directory)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (24, 3, 55, 47)).astype(np.uint8)
    clean = write_h5_set(tmp_path / "clean.h5", data, rng.integers(0, 5, 24))
    poisoned = write_h5_set(tmp_path / "poisoned.h5", data, np.zeros(24, dtype=np.int64))
    return directory, clean, poisoned


def test_cli_runs_a_criterion_and_saves_its_repaired_model(deepid_files, tmp_path, capsys):
    model, clean, poisoned = deepid_files
    out = tmp_path / "clp"
    code, stdout, _ = bdprune(capsys, "prune", "--allow-chance-baseline", "--criterion", "clp", "--u", "1", "--clp-all-convs",
                              "--model", model,
                              "--clean-valid", clean, "--poisoned-valid", poisoned, "--out", out, "--no-progress")
    assert code == 0 and "its choice" in stdout
    summary = json.loads((out / "summary.json").read_text())
    record = json.loads((out / "criterion.json").read_text())
    assert summary["criterion"] == record["criterion"] == "clp" and summary["layers"] == [
        "conv_1", "conv_2", "conv_3", "conv_4"]
    chosen = summary["chosen"]
    assert chosen["channels_pruned"] == record["selected"] > 0 and chosen["model_dir"] == "repaired_clp"
    repaired = bdpruning.load_model(out / "repaired_clp", device="cpu")
    for layer, channels in chosen["pruned_channels"].items():
        assert bdpruning.zeroed_channels(repaired, layer) == channels
    assert [p["u"] for p in summary["points"]][:2] == [0.0, 0.5] and "clean_accuracy" in summary["points"][0]
    for name in ("sweep.csv", "sweep.json", "accuracy_asr.png", "scores.png"):
        assert (out / name).stat().st_size > 0


def test_cli_trains_anp_through_lightning_and_refuses_bad_settings(deepid_files, tmp_path, capsys):
    model, clean, poisoned = deepid_files
    out = tmp_path / "anp"
    code, stdout, _ = bdprune(capsys, "prune", "--allow-chance-baseline", "--criterion", "anp", "--iterations", "2", "--images", "16",
                              "--train-batch-size", "8", "--prune-count", "3", "--model", model, "--clean-valid",
                              clean, "--poisoned-valid", poisoned, "--out", out, "--no-progress")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chosen"]["channels_pruned"] == 3 and summary["settings"]["iterations_run"] == 2
    assert bdpruning.load_model(out / "repaired_anp", device="cpu") is not None
    code, _, err = bdprune(capsys, "prune", "--criterion", "rnp", "--mask-threshold", "2", "--model", model,
                           "--clean-valid", clean, "--out", tmp_path / "bad", "--no-progress")
    assert code == 2 and "mask threshold must lie in (0, 1]" in err and not (tmp_path / "bad").exists()
    code, _, err = bdprune(capsys, "prune", "--criterion", "clp", "--layers", "fc_1", "--model", model,
                           "--clean-valid", clean, "--out", tmp_path / "bad", "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "'fc_1' is a Linear, not a Conv2d" in err


def test_a_deepid_from_keras_gets_its_repaired_model_as_keras_h5_too(bd_weights, tmp_path, capsys):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (8, 3, 55, 47)).astype(np.uint8)
    clean = write_h5_set(tmp_path / "clean.h5", data, rng.integers(0, 1283, 8))
    out = tmp_path / "clp"
    code, _, _ = bdprune(capsys, "prune", "--allow-chance-baseline", "--criterion", "clp", "--u", "2", "--clp-all-convs", "--model", bd_weights, "--clean-valid",
                         clean, "--out", out, "--no-progress", "--device", "cpu")
    assert code == 0
    chosen = json.loads((out / "summary.json").read_text())["chosen"]
    keras_copy = bdpruning.load_model(out / "repaired_clp" / "model.h5", device="cpu")
    for layer, channels in chosen["pruned_channels"].items():
        assert bdpruning.zeroed_channels(keras_copy, layer) == channels


def test_thresholds_sweep_every_step_along_the_criterion_order():
    clean, poisoned = planted_data(256, seed=0), planted_data(128, seed=1, poisoned=True)
    result = run_defense(planted_net(), CLP(convs_without_batchnorm=True), clean, poisoned,
                         thresholds=(30, 99))
    steps = [s.step for s in result.steps]
    hit, never = result.thresholds
    assert hit.reached and not never.reached and steps == list(range(17))  # 99 never reached: to the end
    assert result.at(hit.step).accuracy_drop >= 30 > max(s.accuracy_drop for s in result.steps[:hit.step])


def test_criteria_need_clean_data_but_never_poisoned_data():
    with pytest.raises(BdpruningError, match="clean data"):
        ANP(trainer_options=CPU).score(planted_net(), None)
    with pytest.raises(BdpruningError, match="clean data"):
        RNP(trainer_options=CPU).score(planted_net(), None)
    assert CLP().score(planted_net()).settings["data"] is None  # data-free
    with pytest.raises(BdpruningError, match="cannot prune the 17 lowest masks: the layers have 16 channels"):
        ANP(count=17, trainer_options=CPU).score(planted_net(), planted_data(8, seed=0))


def test_api_saves_an_adopted_models_defense_that_reloads(tmp_path):
    clean, poisoned = planted_data(256, seed=0), planted_data(128, seed=1, poisoned=True)
    model = planted_net()
    result = bdpruning.run_defense(model, bdpruning.CLP(convs_without_batchnorm=True), clean, poisoned)
    summary = bdpruning.save_defense(result, model, tmp_path / "clp")
    assert summary["chosen"]["pruned_channels"] == {"features": [BACKDOOR]}
    repaired = bdpruning.load_model(tmp_path / "clp" / "repaired_clp", device="cpu")
    images, labels = poisoned
    triggered = predict_labels(repaired, (images, labels))
    assert (triggered != labels).all()  # the attack fails on every poisoned image
    with pytest.raises(BdpruningError, match="output directory exists"):
        bdpruning.save_defense(result, model, tmp_path / "clp")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["anp", "rnp"])
def test_training_criteria_run_data_parallel(name):
    """Two real CPU processes (ddp_spawn): the masks and the run's record come back to this one."""
    spawn = {"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}
    criterion = {"anp": ANP(iterations=10, images=128, batch_size=32, trainer_options=spawn),
                 "rnp": RNP(images=128, batch_size=32, unlearn_epochs=2, recover_epochs=2, trainer_options=spawn)}[name]
    scores = criterion.score(planted_net(), planted_data(128, seed=0))
    assert BACKDOOR in scores.selection()["features"] and scores.settings["devices"] == 2
    assert scores.settings.get("iterations_run", 10) == 10 and scores.settings.get("unlearn_epochs_run", 2) >= 1


def test_a_criterions_choice_across_layers_compacts_exactly():
    """CLP's choice on two conv layers (one followed by a BatchNorm), pruned then removed for
    real: in float64 the compact model computes what the masked one does."""
    model = bdpruning.adopt(half_batchnorm_net().double(), outputs="logits", example=torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    scores = CLP(u=0.0, convs_without_batchnorm=True).score(model)
    assert len(scores.selection()) == 2
    masked = copy.deepcopy(model)
    for layer, channels in scores.selection().items():
        bdpruning.prune_channels(masked, layer, channels)
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 255
    compact = copy.deepcopy(masked)
    bdpruning.compact_model(compact)
    with torch.no_grad():
        torch.testing.assert_close(compact(images), masked(images), rtol=0, atol=1e-12)
    assert compact.conv_a.out_channels == 6 - len(scores.selection()["conv_a"])


def test_masks_that_overflow_are_refused_naming_the_layer_and_what_to_try():
    """RNP unlearning at a rate of 1,000 overflows the planted net: its masks come out NaN, and
    no channel may be chosen from them (the demo's DeepID did this at the authors' settings)."""
    rnp = RNP(images=128, batch_size=64, unlearn_epochs=3, recover_epochs=2, unlearn_lr=1e3, trainer_options=CPU)
    with pytest.raises(BdpruningError, match="masks of features are not finite .*--rnp-stop-per-batch"):
        rnp.score(planted_net(), planted_data(128, seed=0))
