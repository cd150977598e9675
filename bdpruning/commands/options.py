"""Command-line options shared by several ``bdprune`` commands: devices and data loading for
the Lightning commands, ``--tf32`` for every command that reports numbers, and ``--outputs`` /
``--input-range`` for every command that loads a model."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from ..runtime.trainer_options import TrainerOptions

__all__ = ["add_lightning_arguments", "add_model_arguments", "add_tf32_argument", "lightning_options", "model_options",
           "one_device", "trainer_options"]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--outputs`` and ``--input-range``: what the loaded model returns and takes, where its
    file says otherwise or nothing (see :func:`bdpruning.load_model`)."""
    parser.add_argument("--outputs", choices=["logits", "probabilities"],
                        help="what the model returns (default: read from its graph or record: a final softmax "
                             "means probabilities, anything else logits)")
    parser.add_argument("--input-range", choices=["0..255", "0..1", "normalized"],
                        help="the pixels the model takes; data outside it is refused (default: from the "
                             "record; 0..255 for DeepID; unchecked for other files)")
    parser.add_argument("--model-class", metavar="MODULE:CLASS",
                        help="your nn.Module class (built with no arguments; MODULE importable from here) to load a "
                             "directory saved from an adopted model into (default: its ONNX graph, BatchNorms folded)")


def model_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`bdpruning.load_model` from :func:`add_model_arguments`' options."""
    return {"outputs": args.outputs, "input_range": args.input_range, "into": _model_class(args.model_class)}


def _model_class(spec: str | None) -> type | None:
    """The class ``MODULE:CLASS`` names (the working directory is importable, as for ``python -m``)."""
    if spec is None:
        return None
    import importlib
    import os

    from torch import nn

    from ..errors import BdpruningError

    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise BdpruningError(f"--model-class {spec!r}: expected MODULE:CLASS, e.g. mynets:TinyResNet")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise BdpruningError(f"--model-class {spec!r}: {exc}") from None
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise BdpruningError(f"--model-class {spec!r} is not an nn.Module class")
    return found


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
    return dict(**trainer_options(args).trainer_kwargs(), batch_size=args.batch_size, num_workers=args.workers,
                progress=sys.stdout.isatty(), tf32=args.tf32)


def trainer_options(args: argparse.Namespace, **more) -> TrainerOptions:
    """The :class:`TrainerOptions` of ``--accelerator``, ``--devices`` and ``--strategy``, with ``more``."""
    return TrainerOptions(accelerator=args.accelerator, devices=args.devices, strategy=args.strategy, **more)


def one_device(args: argparse.Namespace) -> str | None:
    """The device of a one-process run (``--devices 1``), evaluated without Lightning: importing
    Lightning costs more than evaluating (see :mod:`bdpruning.evaluation.local_counts`); None for DDP."""
    if args.devices != 1:
        return None
    from ..runtime.devices import check_devices

    check_devices(args.accelerator, args.devices)
    return {"auto": "auto", "cpu": "cpu"}.get(args.accelerator, "cuda")
