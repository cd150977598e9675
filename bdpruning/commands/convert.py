"""``bdprune convert MODEL.h5 --out DIR``: Keras -> ONNX -> PyTorch, verified against Keras.

Exit codes: 0 converted and within tolerance; 1 converted but parity failed (the files are
kept for inspection); 2 a user mistake (one-line error, nothing written).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the command's options (kept free of TensorFlow so ``--help`` stays fast)."""
    parser.add_argument("model", help="Keras .h5: a full model, or DeepID weights from save_weights")
    parser.add_argument("--out", required=True, help="output model directory (must not exist)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--tolerance", type=float,
                        help="largest softmax difference PyTorch vs Keras (default: 1e-4)")
    parser.add_argument("--data", help="HDF5 data set (data, label) to check parity on")
    parser.add_argument("--images", nargs="+", default=[], metavar="IMAGE",
                        help="image files (RGB, the model's size, 0..255) added to the check")
    parser.add_argument("--samples", type=int,
                        help="images checked: random ones (default 256), or the first of --data (default all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images (default: 0)")


def _summary(report: dict) -> str:
    rows = [f"{'backend':<12} {'max_abs_diff':>13} {'argmax_agreement':>17}"]
    for name, agreement in report["backends"].items():
        rows.append(f"{name:<12} {agreement['max_abs_diff']:>13.3g} {agreement['argmax_agreement']:>17.4f}")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    """Convert, print the parity table; return 1 when parity is outside the tolerance."""
    from ..convert.pipeline import convert_keras

    options = {"tolerance": args.tolerance} if args.tolerance is not None else {}
    report = convert_keras(
        args.model, args.out, data=args.data, images=args.images, samples=args.samples,
        seed=args.seed, force=args.force, **options,
    )
    print(f"{args.model} -> {args.out} ({report['architecture']}, {report['num_classes']} classes, "
          f"{report['samples']} images checked against Keras)")
    print(_summary(report))
    if report["passed"]:
        return 0
    print(f"bdprune convert: parity check FAILED: {'; '.join(report['failures'])}. The files were "
          f"written to {args.out} for inspection (see conversion.json).", file=sys.stderr)
    return 1
