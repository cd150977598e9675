"""Lightning evaluation: counts equal an independent computation, exactly, in 1 and 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bdpruning import BdpruningError
from bdpruning.lightning_modules.data import ImageDataModule
from bdpruning.lightning_modules.evaluation import EvaluationModule, evaluate_model, run_evaluation
from bdpruning.lightning_modules.goodnet import GoodNetModule, evaluate_goodnets
from bdpruning.evaluation.metrics import percent
from helpers.cli import bdprune
from helpers.data import safe_noisy_faces, write_h5_set
from helpers.material import BD_WEIGHTS, N, PRUNED_FULL
from helpers.reference import rule

ROW_KEYS = ["repaired", "num_classes", "clean_accuracy", "attack_success_rate", "goodnet_clean_accuracy",
            "goodnet_attack_success_rate", "detection_rate", "false_alarm_rate"]


@pytest.fixture
def clean_and_poisoned(tmp_path, face_images, nets, always_7):
    """Odd-sized clean_and_poisoned: 13 clean images (true labels 860 and 0), 7 poisoned ones (target 0), each
    with a safe float64 margin under every net, so any batching gives the same labels anywhere."""
    models = [*nets, always_7]
    clean, labels = safe_noisy_faces(face_images, 13, models)
    clean_path = write_h5_set(tmp_path / "clean.h5", clean, labels)
    poisoned = safe_noisy_faces(face_images, 7, models, seed=1)[0]
    poisoned_path = write_h5_set(tmp_path / "poisoned.h5", poisoned, np.zeros(7))
    return clean_path, poisoned_path


def _images_labels(path) -> tuple[torch.Tensor, torch.Tensor]:
    import h5py

    with h5py.File(path) as handle:
        return torch.tensor(handle["data"][()], dtype=torch.float32), torch.tensor(handle["label"][()])


def test_evaluation_counts_are_the_model_s_hits(nets, clean_and_poisoned):
    bd, _ = nets
    results = evaluate_model(bd, *clean_and_poisoned, batch_size=4)
    (clean, labels), (poisoned, targets) = map(_images_labels, clean_and_poisoned)
    with torch.no_grad():
        correct = int((bd(clean).argmax(1) == labels).sum())
        attacks = int((bd(poisoned).argmax(1) == targets).sum())
    assert results.to_json() == {
        "clean_images": 13, "clean_correct": correct, "poisoned_images": 7, "attack_successes": attacks,
        "clean_accuracy": percent(correct, 13), "attack_success_rate": percent(attacks, 7),
    }
    valid = ImageDataModule(clean_valid=clean_and_poisoned[0], poisoned_valid=clean_and_poisoned[1], batch_size=5)
    assert run_evaluation(EvaluationModule(bd), valid, stage="validate") == {
        key: getattr(results, key) for key in ("clean_images", "clean_correct", "poisoned_images", "attack_successes")
    }


def test_goodnet_rates_follow_the_rule(nets, always_7, clean_and_poisoned):
    bd, pruned = nets
    rows = evaluate_goodnets(bd, [pruned, always_7], *clean_and_poisoned, batch_size=4)
    (clean, labels), (poisoned, targets) = map(_images_labels, clean_and_poisoned)
    for repaired, row in zip([pruned, always_7], rows):
        with torch.no_grad():
            on_clean, on_poisoned = repaired(clean).argmax(1), repaired(poisoned).argmax(1)
        goodnet_clean, goodnet_poisoned = torch.tensor(rule(bd, repaired, clean)), torch.tensor(rule(bd, repaired, poisoned))
        assert row.to_json() == {
            "clean_accuracy": percent(int((on_clean == labels).sum()), 13),
            "attack_success_rate": percent(int((on_poisoned == targets).sum()), 7),
            "goodnet_clean_accuracy": percent(int((goodnet_clean == labels).sum()), 13),
            "goodnet_attack_success_rate": percent(int((goodnet_poisoned == targets).sum()), 7),
            "detection_rate": percent(int((goodnet_poisoned == N).sum()), 7),
            "false_alarm_rate": percent(int((goodnet_clean == N).sum()), 13),
        }
    assert 0 < rows[0].false_alarm_rate < 100 and rows[1].detection_rate == 100


@pytest.mark.slow
def test_two_processes_count_exactly_what_one_counts(nets, always_7, clean_and_poisoned):
    """ddp_spawn from this pytest process: 2 CPU processes, gloo, unpadded shards of 13 and 7."""
    bd, pruned = nets
    data = ImageDataModule.for_model(bd, clean_test=clean_and_poisoned[0], poisoned_test=clean_and_poisoned[1], batch_size=2)
    one = run_evaluation(GoodNetModule(bd, [pruned, always_7]), data)
    two = run_evaluation(GoodNetModule(bd, [pruned, always_7]), data,
                         accelerator="cpu", devices=2, strategy="ddp_spawn")
    assert one["0/clean_images"] == 13 and one["0/poisoned_images"] == 7
    assert two == one  # equal counts, every one of them


@pytest.mark.slow
def test_cli_evaluate_under_ddp_equals_one_process(nets, clean_and_poisoned, tmp_path):
    """``--strategy ddp``: Lightning re-runs ``python -m bdpruning.cli`` in a second process."""
    result = subprocess.run(
        [sys.executable, "-m", "bdpruning.cli", "evaluate", "--model", str(BD_WEIGHTS), "--clean", str(clean_and_poisoned[0]),
         "--poisoned", str(clean_and_poisoned[1]), "--batch-size", "3", "--out", "two.json",
         "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("clean accuracy") == 1  # only the first process reports
    two = json.loads((tmp_path / "two.json").read_text())
    assert two.pop("precision")["tf32"] is False  # the JSON records the precision: fp32 by default
    one = evaluate_model(nets[0], *clean_and_poisoned)
    assert two == {"model": str(BD_WEIGHTS), "clean": str(clean_and_poisoned[0]), "poisoned": str(clean_and_poisoned[1]), **one.to_json()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.h5", "poisoned.h5", "two.json"]


def test_cli_evaluate_and_goodnet_write_their_results(clean_and_poisoned, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be left in the working directory but the results
    clean, poisoned = map(str, clean_and_poisoned)
    code, out, err = bdprune(capsys, "evaluate", "--model", BD_WEIGHTS, "--clean", clean, "--poisoned", poisoned,
                             "--out", "evaluate.json")
    assert code == 0, err
    assert "clean accuracy" in out and "attack success rate" in out
    results = json.loads((tmp_path / "evaluate.json").read_text())
    assert results["clean_images"] == 13 and results["poisoned_images"] == 7 and "clean_accuracy" in results

    code, out, err = bdprune(capsys, "goodnet", "--bd", BD_WEIGHTS, "--repaired", PRUNED_FULL, PRUNED_FULL,
                             "--clean", clean, "--poisoned", poisoned, "--out", "gn")
    assert code == 0, err
    rows = json.loads((tmp_path / "gn" / "goodnet.json").read_text())
    assert [list(row) for row in rows] == [ROW_KEYS, ROW_KEYS] and rows[0] == rows[1]
    assert rows[0]["num_classes"] == N and rows[0]["repaired"] == str(PRUNED_FULL)
    assert (tmp_path / "gn" / "goodnet.png").read_bytes()[:4] == b"\x89PNG"
    assert out.count(str(PRUNED_FULL)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.h5", "evaluate.json", "gn", "poisoned.h5"]

    code, _, err = bdprune(capsys, "goodnet", "--bd", BD_WEIGHTS, "--repaired", PRUNED_FULL,
                           "--clean", clean, "--poisoned", poisoned, "--out", "gn")
    assert code == 2 and "gn: output directory exists" in err


def test_cli_bad_input_is_one_line_exit_2(clean_and_poisoned, tmp_path, capsys):
    clean, poisoned = map(str, clean_and_poisoned)
    evaluate = ["evaluate", "--model", BD_WEIGHTS, "--out", tmp_path / "r.json"]
    wrong_labels = write_h5_set(tmp_path / "labels.h5", np.zeros((3, 3, 55, 47), np.uint8), np.array([0, 1, N]))
    wrong_shape = write_h5_set(tmp_path / "shape.h5", np.zeros((3, 3, 32, 32), np.uint8), np.zeros(3))
    cases = [
        (["--clean", wrong_labels], "labels.h5: labels range 0..1283, outside the model's 1283 classes"),
        (["--clean", clean, "--poisoned", wrong_shape], "shape.h5: images have shape (3, 32, 32), the model expects"),
        (["--clean", tmp_path / "missing.h5"], "missing.h5: no such file"),
        (["--clean", clean, "--accelerator", "gpu", "--devices", torch.cuda.device_count() + 1],
         f"but this machine has {torch.cuda.device_count()} GPU(s)"),
        (["--clean", clean, "--accelerator", "cpu", "--devices", os.cpu_count() + 1], "CPU core(s)"),
    ]
    for args, message in cases:
        code, out, err = bdprune(capsys, *evaluate, *args)
        assert (code, out) == (2, "") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r.json").exists()


def test_more_processes_than_images_is_refused_before_they_start(nets, tmp_path):
    one = write_h5_set(tmp_path / "one.h5", np.zeros((1, 3, 55, 47), np.uint8), np.zeros(1))
    with pytest.raises(BdpruningError, match="one.h5: 1 images for 2 processes"):
        evaluate_model(nets[0], one, accelerator="cpu", devices=2, strategy="ddp_spawn")
