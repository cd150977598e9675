"""Machine-readable sweep results: ``sweep.csv``, ``sweep.json`` and ``summary.json``."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict
from pathlib import Path

from ..sweep.lab import SweepResult, ThresholdHit

__all__ = ["threshold_dirname", "write_sweep_results", "summary_dict", "write_rows_csv"]

_COLUMNS = ["step", "channel", "fraction_pruned", "clean_accuracy", "attack_success_rate", "accuracy_drop"]


def threshold_dirname(threshold: float) -> str:
    """Directory of the repaired model for a threshold: ``repaired_2pct``, ``repaired_2.5pct``."""
    return f"repaired_{threshold:g}pct"


def summary_dict(result: SweepResult, extra: dict | None = None) -> dict:
    """The summary: baseline, and for every threshold the step, channels and metrics there."""
    base = result.all_steps[0]

    def threshold_entry(hit: ThresholdHit) -> dict:
        entry = {"threshold": hit.threshold, "reached": hit.reached}
        if hit.reached:
            entry.update(
                step=hit.step,
                channels_pruned=hit.step,
                fraction_pruned=hit.fraction_pruned,
                clean_accuracy=hit.clean_accuracy,
                attack_success_rate=hit.attack_success_rate,
                accuracy_drop=base.clean_accuracy - hit.clean_accuracy,
                pruned_channels=result.ranking.order[: hit.step],
                model_dir=threshold_dirname(hit.threshold),
            )
        return entry

    return {
        "layer": result.layer,
        "rank_layer": result.rank_layer,
        "channels": len(result.ranking.order),
        "clean_samples": result.clean_samples,
        "poisoned_samples": result.poisoned_samples,
        "baseline": {"clean_accuracy": base.clean_accuracy, "attack_success_rate": base.attack_success_rate},
        "thresholds": [threshold_entry(hit) for hit in result.thresholds],
        "full_sweep": result.full_sweep,
        "steps_recorded": len(result.steps) - 1,
        **(extra or {}),
    }


def write_rows_csv(rows: list[dict], path: str | os.PathLike[str], columns: list[str]) -> None:
    """Write ``rows`` as CSV with ``columns`` (None written as an empty cell, other keys left out)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)


def write_sweep_results(result: SweepResult, directory: str | os.PathLike[str], extra: dict | None = None) -> dict:
    """Write ``sweep.csv``, ``sweep.json`` and ``summary.json`` into ``directory``; return the summary."""
    directory = Path(directory)
    rows = [asdict(step) for step in result.steps]
    write_rows_csv(rows, directory / "sweep.csv", _COLUMNS)
    ranking = [
        {"rank": i, "channel": c, "mean_activation": result.ranking.mean_activation[c]}
        for i, c in enumerate(result.ranking.order)
    ]
    sweep = {"layer": result.layer, "rank_layer": result.rank_layer, "masked_at": result.masked_at,
             "ranking": ranking, "steps": rows}
    (directory / "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")
    summary = summary_dict(result, extra)
    (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
