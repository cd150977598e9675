"""``bdprune compact --model B' --out DIR``: remove B''s pruned channels for real.

Exit codes: 0 compacted and equal to the masked model within tolerance; 1 written but the
check failed (the files are kept for inspection); 2 a user mistake (one line, nothing written).
"""

from __future__ import annotations

import argparse
import sys

from .options import add_model_arguments, add_tf32_argument, model_options

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="repaired model: model directory, ONNX file or Keras .h5")
    parser.add_argument("--out", required=True, help="output model directory (must not exist unless --force)")
    parser.add_argument("--layer", default="conv_3",
                        help="for a model without pruning masks: the layer whose all-zero channels go (default: conv_3)")
    parser.add_argument("--data", help="HDF5 data set to compare the compact and the masked model on")
    parser.add_argument("--samples", type=int,
                        help="images compared: random ones (default 256), or the first of --data (default all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images (default: 0)")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest absolute output difference allowed (default: 1e-5)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    add_model_arguments(parser)
    add_tf32_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ..workflows.compact import compact_directory

    report = compact_directory(args.model, args.out, layer=args.layer, data=args.data, samples=args.samples,
                               seed=args.seed, tolerance=args.tolerance, force=args.force, tf32=args.tf32,
                               model_options=model_options(args))
    for step in report["removed"]:
        members = ", ".join(f"{m['layer']} ({m['role']})" for m in step["members"][1:])
        print(f"{step['layer']}: removed {step['count']} of {step['of']} channels; also shrank {members}")
    before, after = report["before"], report["after"]
    print(f"{'':12}{'before':>14}{'after':>14}{'ratio':>8}")
    print(f"{'parameters':12}{before['parameters']:>14,}{after['parameters']:>14,}{report['parameters_ratio']:>8.3f}")
    print(f"{'FLOPs/image':12}{before['flops']:>14,}{after['flops']:>14,}{report['flops_ratio']:>8.3f}")
    images = report["inputs"].get("images") or report["inputs"].get("random")
    print(f"compact vs masked on {images} images: max abs diff {report['max_abs_diff']:.3g}, "
          f"top-1 agreement {report['argmax_agreement']:.4f}")
    if report["passed"]:
        print(f"compact model in {args.out}")
        return 0
    print(f"bdprune compact: check FAILED: {'; '.join(report['failures'])}. The files were written to "
          f"{args.out} for inspection (see compaction.json).", file=sys.stderr)
    return 1
