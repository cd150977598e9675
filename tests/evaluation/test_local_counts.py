"""One-process evaluation: counts equal Lightning's, without importing Lightning or matplotlib."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from bdpruning.evaluation.local_counts import count_evaluation, count_goodnets
from helpers.data import write_h5_set
from helpers.material import BD_WEIGHTS, ROOT


def test_one_process_counts_equal_lightning_s(nets, always_7, safe_set, tmp_path):
    from bdpruning.lightning_modules.evaluation import evaluate_model
    from bdpruning.lightning_modules.goodnet import evaluate_goodnets

    bd, repaired = nets
    path = safe_set[0]
    poisoned = write_h5_set(tmp_path / "poisoned.h5", safe_set[1][:5], np.zeros(5))
    assert count_evaluation(bd, path, poisoned, batch_size=4) == evaluate_model(bd, path, poisoned, batch_size=4)
    assert count_evaluation(bd, path) == evaluate_model(bd, path)
    assert count_goodnets(bd, [repaired, always_7], path, poisoned, batch_size=3) == \
        evaluate_goodnets(bd, [repaired, always_7], path, poisoned, batch_size=3)


def test_one_device_evaluate_does_not_import_lightning_or_matplotlib(safe_set, tmp_path):
    code = ("import sys; from bdpruning.cli import main; "
            f"code = main(['evaluate', '--model', {str(BD_WEIGHTS)!r}, '--clean', {str(safe_set[0])!r}, "
            f"'--out', {str(tmp_path / 'e.json')!r}, '--accelerator', 'cpu']); "
            "heavy = [m for m in ('pytorch_lightning', 'torchmetrics', 'matplotlib', 'tensorflow') if m in sys.modules]; "
            "print(code, heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip().endswith("0 []"), result.stdout + result.stderr
