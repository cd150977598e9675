"""``bdprune`` itself: user errors in one line, ``-v`` shows bdpruning's debug messages only."""

from __future__ import annotations

import subprocess
import sys

from helpers.material import ROOT


def test_cli_reports_user_errors_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bdpruning.cli", "nonsense"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2 and "unknown command 'nonsense'" in result.stderr
