"""``bdprune goodnet``: GoodNet(B, B') for each repaired model B', as the Lab-3 table and plot."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_lightning_arguments, add_model_arguments, lightning_options, model_options, one_device

__all__ = ["add_arguments", "run"]

_COLUMNS = [  # (row key, header) of the printed table, all in percent
    ("clean_accuracy", "B' acc"),
    ("attack_success_rate", "B' ASR"),
    ("goodnet_clean_accuracy", "G acc"),
    ("goodnet_attack_success_rate", "G ASR"),
    ("detection_rate", "detected"),
    ("false_alarm_rate", "false alarm"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bd", required=True, help="the backdoored model B (.h5, .onnx or model directory)")
    parser.add_argument("--repaired", required=True, nargs="+", help="one or more repaired models B'")
    parser.add_argument("--clean", required=True, help="clean test set (HDF5 data/label)")
    parser.add_argument("--poisoned", required=True, help="poisoned test set; its labels hold the attacker's target")
    parser.add_argument("--out", default="runs/goodnet",
                        help="output directory for goodnet.json and goodnet.png (default: runs/goodnet)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    add_model_arguments(parser)
    add_lightning_arguments(parser)


def _print_table(rows: list[dict]) -> None:
    first = "repaired B'"
    width = max(len(first), *(len(row["repaired"]) for row in rows))
    print(f"{first:<{width}}  " + "  ".join(f"{header:>11}" for _, header in _COLUMNS) + "   (%)")
    for row in rows:
        cells = ("-" if row[key] is None else f"{row[key]:.2f}" for key, _ in _COLUMNS)
        print(f"{row['repaired']:<{width}}  " + "  ".join(f"{cell:>11}" for cell in cells))
    print(f"G = GoodNet(B, B'); a flagged clean input counts as an error; flagged label = {rows[0]['num_classes']}")


def run(args: argparse.Namespace) -> int:
    from ..workflows.evaluate import goodnet_stage

    rows = goodnet_stage(args.bd, args.repaired, args.clean, args.poisoned, args.out, force=args.force,
                         device=one_device(args), options=lightning_options(args), model_options=model_options(args))
    if rows is None:  # an extra ddp process: the first one reports
        return 0
    _print_table(rows)
    print(f"results in {Path(args.out)}")
    return 0
