"""``bdprune demo``: build the embedded BadNet (cached) and run the whole defense on it."""

from __future__ import annotations

import argparse

from .options import add_tf32_argument

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run directory (replaced; default runs/demo)")
    parser.add_argument("--cache", help="where the demo data and BadNet are built and reused "
                                        "(default $XDG_CACHE_HOME/bdpruning/demo)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[2.0, 4.0, 10.0, 20.0])
    add_tf32_argument(parser)
    parser.add_argument("--finetune-epochs", type=int, default=10,
                        help="epochs of fine-pruning for the first repaired model (default: 10)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data split (default 0); another seed also trains its own BadNet")
    parser.add_argument("--rebuild", action="store_true",
                        help="retrain the BadNet in Keras instead of using the shipped data/demo_bd_net.h5 "
                             "(needs the [convert] extra; TensorFlow training is not reproducible across CPUs, "
                             "so the numbers then differ from the README's)")


def run(args: argparse.Namespace) -> int:
    from ..demo.pipeline import run_demo

    report = run_demo(args.out, args.cache, thresholds=args.thresholds, tf32=args.tf32,
                      finetune_epochs=args.finetune_epochs,
                      build_options={"seed": args.seed, "rebuild": args.rebuild})
    print(f"report: {report}")
    return 0
