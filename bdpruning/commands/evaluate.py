"""``bdprune evaluate``: clean accuracy and attack success rate of one model, with Lightning.

One CPU or GPU process by default; ``--devices 2 --strategy ddp`` runs data-parallel
processes (Lightning re-runs this command in each; only the first prints and writes).
"""

from __future__ import annotations

import argparse
import json

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
    from ..runtime.atomic import atomic_file
    from ..models.loading import load_model
    from ..numerics.precision import precision_record

    device = one_device(args)
    if device is not None:
        from ..evaluation.local_counts import count_evaluation
        from ..runtime.devices import resolve_device

        model = load_model(args.model, device=resolve_device(device), **model_options(args))
        results = count_evaluation(model, args.clean, args.poisoned, batch_size=args.batch_size, tf32=args.tf32)
    else:
        from ..lightning_modules.evaluation import evaluate_model

        model = load_model(args.model, device="cpu", **model_options(args))
        results = evaluate_model(model, args.clean, args.poisoned, **lightning_options(args))
    if results is None:  # an extra ddp process: the first one reports
        return 0
    results = {"model": args.model, "clean": args.clean, "poisoned": args.poisoned, **results,
               "precision": precision_record(args.tf32)}
    if args.out:
        with atomic_file(args.out) as handle:
            json.dump(results, handle, indent=2)
            handle.write("\n")
    print(f"model                {args.model}")
    print(f"clean accuracy       {_rate(results['clean_accuracy']):>9}  "
          f"({results['clean_correct']} of {results['clean_images']})")
    if args.poisoned:
        print(f"attack success rate  {_rate(results['attack_success_rate']):>9}  "
              f"({results['attack_successes']} of {results['poisoned_images']})")
    if args.out:
        print(f"results in {args.out}")
    return 0
