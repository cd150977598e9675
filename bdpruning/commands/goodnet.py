"""``bdprune goodnet``: GoodNet(B, B') for each repaired model B', as the Lab-3 table and plot."""

from __future__ import annotations

import argparse
import json

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
    from ..runtime.atomic import atomic_dir, prepare_out_dir
    from ..models.loading import load_model
    from ..models import model_info
    from ..plots import plot_goodnet

    out = prepare_out_dir(args.out, args.force)
    device = one_device(args)
    if device is not None:  # one process: no Lightning (see bdpruning.evaluation.local_counts)
        from ..evaluation.local_counts import count_goodnets
        from ..runtime.devices import resolve_device

        bd = load_model(args.bd, device=resolve_device(device), **model_options(args))
        repaired = [load_model(path, device=resolve_device(device), **model_options(args)) for path in args.repaired]
        rates = count_goodnets(bd, repaired, args.clean, args.poisoned, batch_size=args.batch_size, tf32=args.tf32)
    else:
        from ..lightning_modules.goodnet import evaluate_goodnets

        bd = load_model(args.bd, device="cpu", **model_options(args))
        repaired = [load_model(path, device="cpu", **model_options(args)) for path in args.repaired]
        rates = evaluate_goodnets(bd, repaired, args.clean, args.poisoned, **lightning_options(args))
    if rates is None:  # an extra ddp process: the first one reports
        return 0
    num_classes = model_info(bd).num_classes
    rows = [{"repaired": path, "num_classes": num_classes, **row} for path, row in zip(args.repaired, rates)]
    with atomic_dir(out) as directory:
        (directory / "goodnet.json").write_text(json.dumps(rows, indent=2) + "\n")
        plot_goodnet(rows, directory / "goodnet.png")
    _print_table(rows)
    print(f"results in {out}")
    return 0
