"""Fine-pruning (``bdprune finetune``): pruned channels stay zero, the model learns, runs repeat
exactly for a seed, the result reloads and serves as B' in GoodNet, DDP counts like one process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdpruning import BdpruningError, GoodNet, adopt, find_layer, load_model, save_model_dir
from bdpruning.pruning.finetuning import finetune_loss, log_probabilities
from bdpruning.workflows.finetune import save_finetune_run
from bdpruning.lightning_modules.finetune import finetune_model
from bdpruning.pruning.masks import masked_channels, plain_state_dict, pruned_selection
from helpers.cli import bdprune
from helpers.data import QUADRANT_TARGET, noisy_faces, quadrant_images, write_h5_set
from helpers.material import PRUNED_2PCT_CHANNELS
from helpers.nets import SMALL_DEEPID_PRUNED, small_deepid

TARGET = QUADRANT_TARGET  # the poisoned set's target label
CPU = {"accelerator": "cpu"}


@pytest.fixture
def quadrant_sets(tmp_path) -> SimpleNamespace:
    """Odd-sized quadrant_sets: 47 training images, 21 clean and 13 poisoned evaluation images."""
    return SimpleNamespace(
        train=write_h5_set(tmp_path / "train.h5", *quadrant_images(47, seed=0)),
        clean=write_h5_set(tmp_path / "clean.h5", *quadrant_images(21, seed=1)),
        poisoned=write_h5_set(tmp_path / "poisoned.h5", *quadrant_images(13, seed=2, trigger=True)),
    )


def images_of(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import h5py

    with h5py.File(path) as handle:
        return torch.tensor(handle["data"][()], dtype=torch.float32), torch.tensor(handle["label"][()])


def pool_3(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The pool_3 activations of ``images``, from a forward hook."""
    seen = []
    handle = find_layer(model, "pool_3")[1].register_forward_hook(lambda m, i, out: seen.append(out))
    with torch.no_grad():
        model(images)
    handle.remove()
    return seen[0]


def assert_pruned_at_zero(model: nn.Module, channels: list[int], images: torch.Tensor) -> None:
    conv = find_layer(model, "conv_3")[1]
    assert torch.count_nonzero(conv.weight[channels]) == 0 and torch.count_nonzero(conv.bias[channels]) == 0
    activations = pool_3(model, images)
    assert torch.count_nonzero(activations[:, channels]) == 0
    kept = [c for c in range(conv.weight.shape[0]) if c not in channels]
    assert torch.count_nonzero(activations[:, kept]) > 0  # the hook saw real activations


def hits(model: nn.Module, path: Path) -> int:
    images, labels = images_of(path)
    with torch.no_grad():
        return int((model(images).argmax(1) == labels).sum())


def test_the_loss_is_cross_entropy_even_where_the_softmax_saturates():
    model = small_deepid(pruned=[])
    with torch.no_grad():
        model.output.bias[3] += 200  # every image: class 3; the others' probabilities underflow to 0
    images = torch.from_numpy(quadrant_images(4, seed=0)[0]).float()
    probabilities = model(images)
    assert torch.count_nonzero(probabilities[:, :3]) == 0
    log_p = log_probabilities(model, images)
    assert torch.isfinite(log_p).all() and (log_p[:, :3] < -100).all()
    torch.testing.assert_close(log_p.exp(), probabilities)
    loss = finetune_loss(model, images, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert loss > 100 and model.output.bias.grad[3] == pytest.approx(0.75)  # mean of p - onehot
    # any other model says what it returns; bdpruning never guesses
    generic = nn.Sequential(nn.Flatten(), nn.Linear(3 * 55 * 47, 10), nn.Softmax(dim=1))
    with pytest.raises(BdpruningError, match="bdpruning.adopt"):
        log_probabilities(generic, images)
    adopt(generic, outputs="probabilities", example=images)  # the logits under its softmax are used
    torch.testing.assert_close(log_probabilities(generic, images), F.log_softmax(generic[1](generic[0](images)), 1))
    logits_net = adopt(nn.Sequential(nn.Flatten(), nn.Linear(3 * 55 * 47, 10)), outputs="logits", example=images)
    labels = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(finetune_loss(logits_net, images, labels), F.cross_entropy(logits_net(images), labels))


def test_finetuning_learns_and_keeps_pruned_channels_at_zero(quadrant_sets):
    model = small_deepid()
    start = {name: value.clone() for name, value in plain_state_dict(model).items()}
    before = hits(model, quadrant_sets.clean), hits(model, quadrant_sets.poisoned)
    result = finetune_model(model, quadrant_sets.train, 2, clean_eval=quadrant_sets.clean, poisoned_eval=quadrant_sets.poisoned,
                            batch_size=8, **CPU)
    assert result.model is model and result.pruned == {"conv_3": SMALL_DEEPID_PRUNED}
    assert_pruned_at_zero(model, SMALL_DEEPID_PRUNED, images_of(quadrant_sets.clean)[0])
    end = plain_state_dict(model)
    assert [name for name in start if torch.equal(start[name], end[name])] == []  # every tensor trained
    assert [row.epoch for row in result.history] == [0, 1, 2]
    assert result.history[0].train_loss is None and all(row.train_loss > 0 for row in result.history[1:])
    assert all(row.evaluation.clean_images == 21 and row.evaluation.poisoned_images == 13 for row in result.history)
    # the history's counts are the model's hits before and after, counted here independently
    assert (result.before["clean_correct"], result.before["attack_successes"]) == before
    assert (result.after["clean_correct"], result.after["attack_successes"]) == (
        hits(model, quadrant_sets.clean), hits(model, quadrant_sets.poisoned))
    assert result.after.clean_accuracy > result.before.clean_accuracy + 50
    assert result.after["clean_accuracy"] == result.after.clean_accuracy  # rows read as the dicts they were
    assert result.sets == {"train": str(quadrant_sets.train), "clean_eval": str(quadrant_sets.clean),
                           "poisoned_eval": str(quadrant_sets.poisoned)}


def test_the_same_seed_gives_the_same_weights_and_history(quadrant_sets):
    runs = [finetune_model(small_deepid(), quadrant_sets.train, 2, seed=seed, batch_size=8, **CPU) for seed in (3, 3, 4)]
    first, again, other = (plain_state_dict(run.model) for run in runs)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert runs[0].history == runs[1].history and runs[0].sets["clean_eval"] == str(quadrant_sets.train)
    assert not all(torch.equal(first[name], other[name]) for name in first)  # another data order


def test_a_keras_b_prime_keeps_its_zeroed_channels_and_serves_in_goodnet(pruned_full, bd_weights, face_images,
                                                                         tmp_path):
    model = load_model(pruned_full, device="cpu")
    assert masked_channels(model) == {}  # zeroed channels only: training alone could revive them
    start = {name: value.clone() for name, value in plain_state_dict(model).items()}
    faces = noisy_faces(face_images, 12)
    train = write_h5_set(tmp_path / "faces.h5", faces, np.where(np.arange(12) % 2 == 0, 860, 0))
    result = finetune_model(model, train, 1, batch_size=4, **CPU)
    assert result.pruned == masked_channels(model) == {"conv_3": PRUNED_2PCT_CHANNELS}
    images = torch.from_numpy(faces).float()
    assert_pruned_at_zero(model, PRUNED_2PCT_CHANNELS, images)
    assert not torch.equal(start["fc_1.weight"], plain_state_dict(model)["fc_1.weight"])

    out = save_finetune_run(result, tmp_path / "finetuned")
    repaired = load_model(out, device="cpu")
    assert masked_channels(repaired) == {"conv_3": PRUNED_2PCT_CHANNELS}
    keras_copy = load_model(out / "model.h5", device="cpu")  # the fine-tuned weights in the Keras file's layout
    assert pruned_selection(keras_copy) == {"conv_3": PRUNED_2PCT_CHANNELS}
    with torch.no_grad():
        assert torch.equal(repaired(images), model(images))
        torch.testing.assert_close(keras_copy(images), model(images), rtol=0, atol=1e-6)
    labels = GoodNet(load_model(bd_weights, device="cpu"), repaired)(face_images)
    assert labels.shape == (2,) and labels.dtype == torch.int64


def test_the_saved_run_reloads_with_the_same_pruned_channels_and_predictions(quadrant_sets, tmp_path):
    result = finetune_model(small_deepid(), quadrant_sets.train, 1, clean_eval=quadrant_sets.clean, poisoned_eval=quadrant_sets.poisoned,
                            batch_size=8, **CPU)
    out = save_finetune_run(result, tmp_path / "run")
    assert sorted(p.name for p in out.iterdir()) == [
        "finetune.csv", "finetune.json", "finetune.png", "model.json", "model.onnx", "model.safetensors"]
    repaired = load_model(out, device="cpu")
    assert masked_channels(repaired) == {"conv_3": SMALL_DEEPID_PRUNED}
    images = images_of(quadrant_sets.clean)[0]
    with torch.no_grad():
        assert torch.equal(repaired(images), result.model(images))
    assert_pruned_at_zero(repaired, SMALL_DEEPID_PRUNED, images)
    meta = json.loads((out / "model.json").read_text())
    assert meta["pruned"] == {"conv_3": SMALL_DEEPID_PRUNED} and meta["finetuned"]["settings"]["epochs"] == 1
    assert meta["finetuned"]["after"] == {key: result.after[key] for key in ("clean_accuracy", "attack_success_rate")}
    goodnet = GoodNet(small_deepid(pruned=[]), repaired)
    assert goodnet(images).shape == (21,)


def test_cli_finetune_writes_a_model_directory_and_its_history(quadrant_sets, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be left in the working directory but the results
    bd, b_prime = tmp_path / "bd", tmp_path / "b_prime"
    for directory, model in ((bd, small_deepid(pruned=[])), (b_prime, small_deepid())):
        directory.mkdir()
        save_model_dir(model, directory)
    code, out, err = bdprune(capsys, "finetune", "--model", b_prime, "--clean-valid", quadrant_sets.train,
                             "--poisoned-valid", quadrant_sets.poisoned, "--clean-test", quadrant_sets.clean, "--epochs", 2,
                             "--batch-size", 8, "--accelerator", "cpu", "--out", "ft")
    assert code == 0, err
    assert "before" in out and "epoch 2" in out and "conv_3 5 channels" in out and "in ft" in out
    run = tmp_path / "ft"
    summary = json.loads((run / "finetune.json").read_text())
    assert [row["epoch"] for row in summary["history"]] == [0, 1, 2]
    assert summary["sets"] == {"train": str(quadrant_sets.train), "clean_eval": str(quadrant_sets.clean),
                               "poisoned_eval": str(quadrant_sets.poisoned)}
    assert summary["settings"]["optimizer"] == "adam" and summary["settings"]["lr"] == 1e-3
    assert summary["settings"]["layer"] == "conv_3"  # the layer fine-tuned, read from the masks
    assert summary["model"] == str(b_prime) and summary["pruned"] == {"conv_3": SMALL_DEEPID_PRUNED}
    assert summary["before"] == summary["history"][0] and summary["after"] == summary["history"][-1]
    with open(run / "finetune.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["0", "1", "2"] and rows[0]["train_loss"] == ""
    assert float(rows[2]["clean_accuracy"]) == summary["after"]["clean_accuracy"]
    assert (run / "finetune.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "b_prime", "bd", "clean.h5", "ft", "poisoned.h5", "train.h5"]

    code, out, err = bdprune(capsys, "goodnet", "--bd", bd, "--repaired", run, "--clean", quadrant_sets.clean,
                             "--poisoned", quadrant_sets.poisoned, "--accelerator", "cpu", "--out", "gn")
    assert code == 0, err


def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(quadrant_sets, tmp_path, capsys):
    b_prime, unpruned, existing = tmp_path / "b_prime", tmp_path / "unpruned", tmp_path / "existing"
    for directory, model in ((b_prime, small_deepid()), (unpruned, small_deepid(pruned=[]))):
        directory.mkdir()
        save_model_dir(model, directory)
    existing.mkdir()
    wrong_labels = write_h5_set(tmp_path / "labels.h5", np.zeros((3, 3, 55, 47), np.uint8), np.array([0, 1, 10]))
    wrong_shape = write_h5_set(tmp_path / "shape.h5", np.zeros((3, 3, 32, 32), np.uint8), np.zeros(3))
    train = ["--clean-valid", quadrant_sets.train]
    cases = [
        (["--model", tmp_path / "nope", *train], "nope: no such file or directory"),
        (["--model", unpruned, *train], f"{unpruned}: the model has no pruning masks and no all-zero channels"),
        (["--model", unpruned, *train, "--layer", "conv_9"], f"{unpruned}: unknown layer 'conv_9'"),
        (["--model", b_prime, "--clean-valid", tmp_path / "missing.h5"], "missing.h5: no such file"),
        (["--model", b_prime, "--clean-valid", wrong_labels], "labels.h5: labels range 0..10, outside the model's 10"),
        (["--model", b_prime, *train, "--poisoned-valid", wrong_shape], "shape.h5: images have shape (3, 32, 32)"),
        (["--model", b_prime, *train, "--poisoned-test", quadrant_sets.poisoned], "--poisoned-test needs --clean-test"),
        (["--model", b_prime, *train, "--epochs", 0], "--epochs must be an integer of at least 1 (got 0)"),
        (["--model", b_prime, *train, "--lr", 0], "--lr must be a finite number above 0 (got 0.0)"),
        (["--model", b_prime, *train, "--lr", -1e-3], "--lr must be a finite number above 0"),
        (["--model", b_prime, *train, "--batch-size", 0], "--batch-size must be at least 1"),
        (["--model", b_prime, *train, "--accelerator", "cpu", "--devices", os.cpu_count() + 1], "CPU core(s)"),
    ]
    for args, message in cases:
        code, out, err = bdprune(capsys, "finetune", *args, "--out", tmp_path / "out")
        assert (code, out) == (2, "") and err.count("\n") == 1 and message in err, (args, err)
        assert not (tmp_path / "out").exists()
    code, out, err = bdprune(capsys, "finetune", "--model", b_prime, *train, "--out", existing)
    assert code == 2 and f"{existing}: output directory exists (use --force" in err
    assert list(existing.iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written temporaries


@pytest.mark.slow
def test_ddp_with_two_processes_counts_like_one_and_keeps_channels_at_zero(quadrant_sets, tmp_path):
    """``--strategy ddp``: Lightning re-runs ``python -m bdpruning.cli`` in a second process."""
    b_prime = tmp_path / "b_prime"
    b_prime.mkdir()
    save_model_dir(small_deepid(), b_prime)
    result = subprocess.run(
        [sys.executable, "-m", "bdpruning.cli", "finetune", "--model", str(b_prime), "--clean-valid", str(quadrant_sets.train),
         "--clean-test", str(quadrant_sets.clean), "--poisoned-test", str(quadrant_sets.poisoned), "--epochs", "2",
         "--batch-size", "8", "--out", "ddp", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("before") == 1  # only the first process reports
    two = json.loads((tmp_path / "ddp" / "finetune.json").read_text())
    one = finetune_model(small_deepid(), quadrant_sets.train, 1, clean_eval=quadrant_sets.clean, poisoned_eval=quadrant_sets.poisoned,
                         batch_size=8, **CPU)
    assert two["before"] == one.before.to_json()  # the same counts, every one of them
    assert [row["epoch"] for row in two["history"]] == [0, 1, 2]
    assert all(row["clean_images"] == 21 and row["poisoned_images"] == 13 for row in two["history"])
    repaired = load_model(tmp_path / "ddp", device="cpu")
    assert masked_channels(repaired) == {"conv_3": SMALL_DEEPID_PRUNED}
    assert_pruned_at_zero(repaired, SMALL_DEEPID_PRUNED, images_of(quadrant_sets.clean)[0])

    # ddp_spawn from this process: the history and the weights come back from the first process
    spawned = finetune_model(small_deepid(), quadrant_sets.train, 2, clean_eval=quadrant_sets.clean, poisoned_eval=quadrant_sets.poisoned,
                             batch_size=8, accelerator="cpu", devices=2, strategy="ddp_spawn")
    assert spawned.history[0] == one.before
    assert [row.evaluation.clean_images for row in spawned.history] == [21, 21, 21]
    assert_pruned_at_zero(spawned.model, SMALL_DEEPID_PRUNED, images_of(quadrant_sets.clean)[0])
    # the same processes, data order and seed as ddp: the same training
    ddp_state, spawn_state = plain_state_dict(repaired), plain_state_dict(spawned.model)
    for name in ddp_state:
        torch.testing.assert_close(spawn_state[name], ddp_state[name], rtol=1e-5, atol=1e-6)
    assert [row.evaluation.clean_correct for row in spawned.history] == [row["clean_correct"] for row in two["history"]]
