"""``bdprune prune --devices 2 --strategy ddp``: two real CPU processes, each on an unpadded
shard of an odd-sized set, give the single process's ranking, steps and thresholds exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from conftest import BD_WEIGHTS, bdprune, noisy_faces, write_h5_set


def test_two_ddp_processes_sweep_exactly_as_one(bd_weights, face_images, tmp_path, capsys):
    images = noisy_faces(face_images, 41)  # odd: the shards hold 21 and 20 images
    labels = np.where(np.arange(41) % 2 == 0, 860, 0)
    clean = write_h5_set(tmp_path / "clean.h5", images, labels)
    poisoned = write_h5_set(tmp_path / "poisoned.h5", images[1::2], np.zeros(20))
    common = ["prune", "--model", str(BD_WEIGHTS), "--clean-valid", str(clean), "--poisoned-valid", str(poisoned),
              "--thresholds", "2", "4", "10", "--full-sweep", "--batch-size", "8", "--no-progress"]
    code, _, err = bdprune(capsys, *common, "--out", tmp_path / "one", "--accelerator", "cpu")
    assert code == 0, err
    result = subprocess.run([sys.executable, "-m", "bdpruning.cli", *common, "--out", str(tmp_path / "two"),
                             "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("baseline:") == 1  # only the first process reports
    one, two = (json.loads((tmp_path / run / "sweep.json").read_text()) for run in ("one", "two"))
    assert two["ranking"] == one["ranking"]  # channels and their mean activations, to the last bit
    assert two["steps"] == one["steps"] and len(one["steps"]) == 61
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two")]
    assert summaries[1]["thresholds"] == summaries[0]["thresholds"]
