"""The whole defense on the embedded BadNet: build -> convert -> prune -> fine-prune -> compact -> GoodNet
-> the other pruning criteria (CLP, ANP, RNP) and GoodNet with their B' -> report.

Each stage runs the same ``bdprune`` command a user would type (in a subprocess, so each is a
clean process and the report can list the exact commands), into one run directory that appears
only when every stage succeeded.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from ..data.hdf5 import H5ImageSet
from ..runtime.atomic import atomic_dir
from ..errors import BdpruningError
from .build import DemoFiles, build_demo
from .comparison import DEMO_CRITERIA, criterion_stages
from .report import write_report

__all__ = ["run_demo", "default_cache_dir"]

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where the demo data and BadNet are cached: ``$XDG_CACHE_HOME/bdpruning/demo``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bdpruning" / "demo"


def _bdprune(stage: str, args: Sequence[str], run: Path, label: str | None = None) -> tuple[str, float]:
    """Run ``bdprune STAGE ARGS`` inside the run directory (outputs are named relative to it, so
    what the stages record stays true after the rename); return the command and seconds. The
    log is ``logs/LABEL.log`` (default: the stage)."""
    command = [sys.executable, "-m", "bdpruning.cli", stage, *args]
    shown = "bdprune " + shlex.join([stage, *args])
    log_dir = run / "logs"
    log.info("%s: %s", stage, shown)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=run)
    (log_dir / f"{label or stage}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BdpruningError(f"demo stage {stage!r} failed (exit {result.returncode}): {last}")
    return shown, time.perf_counter() - start


def run_demo(
    out: str | os.PathLike[str],
    cache: str | os.PathLike[str] | None = None,
    *,
    thresholds: Sequence[float] = (2.0, 4.0, 10.0, 20.0),
    finetune_epochs: int = 10,
    build_options: dict | None = None,
    tf32: bool = False,
) -> Path:
    """Run the pipeline into ``out`` (replaced atomically); return the report's path.

    The first repaired model (lowest threshold reached) is fine-tuned on the clean validation set
    for ``finetune_epochs`` (evaluated on the test sets), then compacted: the deployable B'.
    GoodNet is evaluated with every repaired model and the fine-tuned one. ``tf32`` passes
    ``--tf32`` to the stages that report numbers (prune, finetune, compact, goodnet).
    """
    if finetune_epochs < 1:
        raise BdpruningError(f"--finetune-epochs must be at least 1 (got {finetune_epochs})")
    out = Path(out)
    start = time.perf_counter()
    demo: DemoFiles = build_demo(Path(cache or default_cache_dir()).resolve(), **(build_options or {}))
    timings = {"build (cached after the first run)": time.perf_counter() - start}
    commands = []
    precision = ["--tf32"] if tf32 else []
    with atomic_dir(out) as run:
        (run / "logs").mkdir()

        def stage(name: str, args: list[str], label: str | None = None) -> None:
            shown, seconds = _bdprune(name, args, run, label)
            commands.append(shown)
            timings[label or name] = seconds

        stage("convert", [str(demo.bd_net), "--out", "converted", "--data", str(demo.clean_valid)])
        stage("prune", ["--model", "converted", "--clean-valid", str(demo.clean_valid),
                        "--poisoned-valid", str(demo.poisoned_valid), "--out", "pruning",
                        "--thresholds", *[f"{t:g}" for t in thresholds], "--no-progress", *precision])
        summary = json.loads((run / "pruning" / "summary.json").read_text())
        repaired = [f"pruning/{t['model_dir']}" for t in summary["thresholds"] if t["reached"]]
        if repaired:
            stage("finetune", ["--model", repaired[0], "--clean-valid", str(demo.clean_valid),
                               "--clean-test", str(demo.clean_test), "--poisoned-test", str(demo.poisoned_test),
                               "--epochs", str(finetune_epochs), "--out", "finetuned", *precision])
            stage("compact", ["--model", "finetuned", "--out", "compact", "--data", str(demo.clean_valid),
                             *precision])
            stage("goodnet", ["--bd", "converted", "--repaired", *repaired, "finetuned", "--clean",
                              str(demo.clean_test), "--poisoned", str(demo.poisoned_test),
                              "--out", "goodnet", *precision])
        for label, args in criterion_stages(str(demo.clean_valid), str(demo.poisoned_valid), precision,
                                              len(H5ImageSet(demo.clean_valid))):
            stage("prune", args, label)  # CLP, ANP, RNP: the same engine, other criteria
        chosen = [f"defense_{name}/repaired_{name}" for name in DEMO_CRITERIA
                  if (run / f"defense_{name}" / f"repaired_{name}").exists()]
        if chosen:
            stage("goodnet", ["--bd", "converted", "--repaired", *chosen, "--clean", str(demo.clean_test),
                              "--poisoned", str(demo.poisoned_test), "--out", "goodnet_criteria", *precision],
                  "goodnet-criteria")
        report = write_report(run, demo, commands, timings)
    log.info("report written to %s", out / report.name)
    return out / report.name
