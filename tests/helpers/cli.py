"""The ``bdprune`` command, run in this process."""

from __future__ import annotations

from bdpruning.cli import main


def bdprune(capsys, *args) -> tuple[int, str, str]:
    """Run a ``bdprune`` command in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err
