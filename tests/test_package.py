"""The installed package: its names live under ``bdpruning``, every public name is documented."""

from __future__ import annotations

import subprocess
import sys


def test_installed_names_live_under_bdpruning():
    import bdpruning.convert
    import bdpruning.lightning_modules

    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('convert') is not None)"
    assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0


def test_every_public_name_is_documented():
    """The API reference is the docstrings: each public name says what it takes and returns."""
    import inspect

    import bdpruning

    undocumented = [name for name in bdpruning.__all__ if len(inspect.getdoc(getattr(bdpruning, name)) or "") < 20]
    assert undocumented == []
