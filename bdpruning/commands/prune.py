"""``bdprune prune``: the pruning defense, from a model and clean validation data to B'."""

from __future__ import annotations

import argparse

from .options import add_tf32_argument

__all__ = ["add_arguments", "run"]


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r}: thresholds are positive numbers of points (0 < T <= 100)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Keras .h5, ONNX file or bdpruning model directory")
    parser.add_argument("--clean-valid", required=True, help="clean validation set (HDF5 data/label)")
    parser.add_argument("--poisoned-valid", help="poisoned validation set; its labels hold the attacker's target")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    parser.add_argument("--thresholds", type=_threshold, nargs="+", default=[2.0, 4.0, 10.0],
                        help="accuracy drops (points) at which to save a repaired model (default: 2 4 10)")
    parser.add_argument("--layer", default="conv_3", help="conv layer whose channels are pruned")
    parser.add_argument("--rank-layer", default="pool_3", help="layer whose mean activations rank the channels")
    parser.add_argument("--full-sweep", action="store_true", help="prune every channel, not only up to the last threshold")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0, help="seed for torch (the sweep itself is deterministic)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_tf32_argument(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..pruning_run import prune_model

    torch.manual_seed(args.seed)
    summary = prune_model(
        args.model, args.clean_valid, args.out, poisoned_valid=args.poisoned_valid,
        thresholds=args.thresholds, layer=args.layer, rank_layer=args.rank_layer,
        full_sweep=args.full_sweep, device=args.device, batch_size=args.batch_size,
        force=args.force, progress=not args.no_progress, tf32=args.tf32,
    )
    base = summary["baseline"]
    asr = lambda v: "-" if v is None else f"{v:6.2f}"  # noqa: E731
    print(f"baseline: clean accuracy {base['clean_accuracy']:.2f} %, ASR {asr(base['attack_success_rate'])} %")
    print(f"{'threshold':>9}  {'channels':>8}  {'clean acc':>9}  {'ASR':>6}  model")
    for entry in summary["thresholds"]:
        if entry["reached"]:
            print(f"{entry['threshold']:>8g}%  {entry['channels_pruned']:>8}  {entry['clean_accuracy']:>9.2f}"
                  f"  {asr(entry['attack_success_rate'])}  {entry['model_dir']}")
        else:
            print(f"{entry['threshold']:>8g}%  {'never reached':>30}")
    print(f"results in {args.out}")
    return 0
