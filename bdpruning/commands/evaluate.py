"""``bdprune evaluate``: clean accuracy and attack success rate of one model, with Lightning.

One CPU or GPU process by default; ``--devices 2 --strategy ddp`` runs data-parallel
processes (Lightning re-runs this command in each; only the first prints and writes).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

__all__ = ["add_arguments", "run", "add_lightning_arguments", "add_tf32_argument", "lightning_options"]


def add_lightning_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the Lightning commands: devices, data loading."""
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu", "cuda"],
                        help="where to run (default: auto, a GPU when there is one)")
    parser.add_argument("--devices", type=int, default=1, help="processes/GPUs (default: 1)")
    parser.add_argument("--strategy", default="auto", choices=["auto", "ddp", "ddp_spawn"],
                        help="with --devices > 1: ddp (re-runs the command per process) or ddp_spawn")
    parser.add_argument("--batch-size", type=int, default=512,
                        help="images per batch and process (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    add_tf32_argument(parser)


def add_tf32_argument(parser: argparse.ArgumentParser) -> None:
    """``--tf32``: the commands that report numbers compute them in IEEE fp32 unless it is given."""
    parser.add_argument("--tf32", action="store_true", help="allow TF32 on CUDA: faster, numbers may differ "
                                                            "from the reference by fractions of a point")


def lightning_options(args: argparse.Namespace) -> dict:
    """Keyword arguments for the evaluation functions; Lightning's banners are hidden unless -v."""
    if not args.verbose:
        for name in ("pytorch_lightning", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", module="pytorch_lightning")
    return dict(accelerator=args.accelerator, devices=args.devices, strategy=args.strategy,
                batch_size=args.batch_size, num_workers=args.workers, progress=sys.stdout.isatty(), tf32=args.tf32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Keras .h5, ONNX file or bdpruning model directory")
    parser.add_argument("--clean", required=True, help="clean test set (HDF5 data/label)")
    parser.add_argument("--poisoned", help="poisoned test set; its labels hold the attacker's target")
    parser.add_argument("--out", default="runs/evaluate.json", help="JSON results (default: runs/evaluate.json)")
    add_lightning_arguments(parser)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} %"


def run(args: argparse.Namespace) -> int:
    from ..atomic import atomic_file
    from ..loading import load_model
    from ..lightning_modules.evaluation import evaluate_model
    from ..precision import precision_record

    model = load_model(args.model, device="cpu")
    results = evaluate_model(model, args.clean, args.poisoned, **lightning_options(args))
    if results is None:  # an extra ddp process: the first one reports
        return 0
    results = {"model": args.model, "clean": args.clean, "poisoned": args.poisoned, **results,
               "precision": precision_record(args.tf32)}
    with atomic_file(args.out) as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    print(f"model                {args.model}")
    print(f"clean accuracy       {_rate(results['clean_accuracy']):>9}  "
          f"({results['clean_correct']} of {results['clean_images']})")
    if args.poisoned:
        print(f"attack success rate  {_rate(results['attack_success_rate']):>9}  "
              f"({results['attack_successes']} of {results['poisoned_images']})")
    print(f"results in {args.out}")
    return 0
