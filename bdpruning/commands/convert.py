"""``bdprune convert MODEL.h5 --out DIR``: Keras -> ONNX -> PyTorch, verified numerically.

Each backend (Keras, onnxruntime, onnx2torch, DeepID) is measured against a float64 evaluation
of the converted weights; an error that float32 round-off cannot explain fails the check.

Exit codes: 0 converted and verified; 1 converted but parity failed (the files are kept for
inspection); 2 a user mistake (one-line error, nothing written).
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
                        help="also fail when PyTorch's softmax differs from Keras' by more than this "
                             "(a hard absolute bound; default: none, round-off is judged against float64)")
    parser.add_argument("--data", help="HDF5 data set (data, label) to check parity on: real images, "
                                       "the check that counts (without it, random pixels are a fallback)")
    parser.add_argument("--images", nargs="+", default=[], metavar="IMAGE",
                        help="image files (RGB, the model's size, 0..255) added to the check")
    parser.add_argument("--samples", type=int,
                        help="images checked: random ones (default 256), or the first of --data (default all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images (default: 0)")


def _summary(report: dict) -> str:
    bound = report["reference"]["logit_bound_units"]
    rows = [f"against float64 (logit error in float32 units u = 2^-24 of the largest logit; "
            f"round-off bound {bound:.0f} u):",
            f"{'backend':<12} {'softmax err':>11} {'logit err':>10} {'top-1 (safe)':>13} {'vs Keras':>9}  verdict"]
    for name, b in report["backends"].items():
        vs_keras = f"{b['max_abs_diff_vs_keras']:>9.2g}" if "max_abs_diff_vs_keras" in b else f"{'-':>9}"
        verdict = "round-off" if b["explained_by_round_off"] else "ERROR"
        rows.append(f"{name:<12} {b['softmax_max_abs_error']:>11.2g} {b['logit_error_units']:>8.1f} u "
                    f"{b['safe_top1_agreement']:>7.4f} ({b['safe_inputs']}) {vs_keras}  {verdict}")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    """Convert, print the parity table; return 1 when parity is outside the tolerance."""
    from ..workflows.convert import convert_keras

    report = convert_keras(
        args.model, args.out, tolerance=args.tolerance, data=args.data, images=args.images,
        samples=args.samples, seed=args.seed, force=args.force,
    )
    kind = "real" if report["inputs"]["kind"] == "real" else "random (fallback: give --data for real images)"
    print(f"{args.model} -> {args.out} ({report['architecture']}, {report['num_classes']} classes, "
          f"{report['samples']} {kind} images checked)")
    print(_summary(report))
    if report["passed"]:
        return 0
    print(f"bdprune convert: parity check FAILED: {'; '.join(report['failures'])}. The files were "
          f"written to {args.out} for inspection (see conversion.json).", file=sys.stderr)
    return 1
