"""``bdprune evaluate``: clean accuracy and attack success rate of one model, with Lightning.

One CPU or GPU process by default; ``--devices 2 --strategy ddp`` runs data-parallel
processes (Lightning re-runs this command in each; only the first prints and writes).
"""

from __future__ import annotations

import argparse

from .options import add_lightning_arguments, add_model_arguments, lightning_options, model_options, one_device

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Keras .h5, ONNX file or bdpruning model directory")
    parser.add_argument("--clean", required=True, help="clean test set (HDF5 data/label)")
    parser.add_argument("--poisoned", help="poisoned test set; its labels hold the attacker's target")
    parser.add_argument("--out", help="also write the results to this JSON file")
    add_model_arguments(parser)
    add_lightning_arguments(parser)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} %"


def run(args: argparse.Namespace) -> int:
    from ..workflows.evaluate import evaluate_stage

    results = evaluate_stage(args.model, args.clean, args.poisoned, device=one_device(args),
                             options=lightning_options(args), model_options=model_options(args), out=args.out)
    if results is None:  # an extra ddp process: the first one reports
        return 0
    print(f"model                {args.model}")
    print(f"clean accuracy       {_rate(results['clean_accuracy']):>9}  "
          f"({results['clean_correct']} of {results['clean_images']})")
    if args.poisoned:
        print(f"attack success rate  {_rate(results['attack_success_rate']):>9}  "
              f"({results['attack_successes']} of {results['poisoned_images']})")
    if args.out:
        print(f"results in {args.out}")
    return 0
