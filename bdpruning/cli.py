"""``bdprune``: the command line. Each command lives in ``bdpruning.commands.<name>`` and is
imported only when it runs, so ``bdprune --help`` stays fast and TensorFlow-free.

User mistakes (:class:`~bdpruning.errors.BdpruningError`) end as one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from .errors import BdpruningError

__all__ = ["main"]

COMMANDS = {
    "convert": "Keras .h5 -> ONNX -> PyTorch, verified numerically against Keras",
    "prune": "rank channels on clean data, sweep the pruning, save repaired models",
    "evaluate": "clean accuracy and attack success rate of one model",
    "goodnet": "evaluate GoodNet ensembles of B and repaired models",
    "classify": "label images with GoodNet (flagged inputs get the extra class N)",
    "demo": "build the embedded BadNet and run the whole pipeline on it",
    "finetune": "fine-tune a repaired model on clean data, pruned channels kept at zero",
    "compact": "physically remove pruned channels",
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "usage: bdprune COMMAND [options]\n\ncommands:\n" + "\n".join(lines) + \
        "\n\nRun 'bdprune COMMAND --help' for a command's options."


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``bdprune`` command; return the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"bdprune: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    command = importlib.import_module(f"bdpruning.commands.{name}")
    parser = argparse.ArgumentParser(prog=f"bdprune {name}", description=COMMANDS[name])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    command.add_arguments(parser)
    args = parser.parse_args(rest)
    # other libraries log at WARNING and above; -v shows bdpruning's own debug messages only
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bdpruning").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    import torch

    from .runtime.threads import configure_threads

    cpu_processes = getattr(args, "devices", 1) if getattr(args, "accelerator", None) == "cpu" else 1
    threads = torch.get_num_threads()  # given back on return: main() also runs in-process (tests)
    configure_threads(max(1, cpu_processes or 1))  # every core given, shared by DDP's CPU processes
    try:
        return int(command.run(args) or 0)
    except BdpruningError as exc:
        print(f"bdprune {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bdprune {name}: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
