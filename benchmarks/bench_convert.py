"""Throughput of one converted model in each backend, side by side in one run (CPU).

Keras ``predict``, onnxruntime and the onnx2torch module (each on tf2onnx's raw graph and on
the graph after :func:`bdpruning.convert.graph_passes.simplify`) and the named DeepID module
(as loaded, and in ``channels_last`` memory format) run the same batch of seeded random 0..255
images (the size of the Lab-3 validation set) at the same batch size: a warm-up, then the best
of a few round-robin repeats. Prints images/s, the ratio to Keras, whether the named DeepID
(the module that pruning uses) is no slower than 1.5x Keras, and what the NHWC transposes cost
inside the onnx2torch module, timed node by node.

    .venv/bin/python benchmarks/bench_convert.py [--model M.h5] [--images 11547] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from bdpruning.convert import parity
from bdpruning.convert.keras_to_onnx import load_keras, to_onnx
from bdpruning.models.loading import load_model
from bdpruning.models.onnx_graph import onnx_to_torch
from bdpruning.models import DEEPID_INPUT_SHAPE, DeepID

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared" / "models" / "lab3_bd_weights.h5"
SLOWDOWN_LIMIT = 1.5
# onnx2torch modules that only move data around (NHWC transposes and the Keras Flatten plumbing).
_LAYOUT_OPS = ("OnnxTranspose", "OnnxShape", "OnnxGather", "OnnxCast", "OnnxSlice", "OnnxConcat",
               "OnnxReshape", "Flatten")


def _time_side_by_side(
    runners: dict[str, Callable[[np.ndarray], np.ndarray]], images: np.ndarray, repeats: int
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Best seconds per backend; repeats go round-robin so a busy machine slows all alike."""
    for run in runners.values():  # warm-up: one batch each
        run(images[: parity.BATCH_SIZE])
    seconds, outputs = dict.fromkeys(runners, float("inf")), {}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            outputs[name] = run(images)
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    return seconds, outputs


class _NodeTimer(torch.fx.Interpreter):
    """Runs an onnx2torch graph node by node, adding up the seconds per node type."""

    def __init__(self, module: torch.fx.GraphModule) -> None:
        super().__init__(module)
        self.seconds: Counter = Counter()

    def run_node(self, node: torch.fx.Node):
        start = time.perf_counter()
        result = super().run_node(node)
        kind = type(self.module.get_submodule(node.target)).__name__ if node.op == "call_module" else node.op
        self.seconds[kind] += time.perf_counter() - start
        return result


@torch.inference_mode()
def _layout_share(module: torch.fx.GraphModule, images: np.ndarray) -> tuple[float, float]:
    """Seconds per pass spent in transposes and shape/reshape plumbing, and in the whole graph."""
    timer = _NodeTimer(module)
    tensor = torch.from_numpy(images)
    for start in range(0, len(images), parity.BATCH_SIZE):
        timer.run(tensor[start:start + parity.BATCH_SIZE])
    layout = sum(timer.seconds[kind] for kind in _LAYOUT_OPS)
    return layout, sum(timer.seconds.values())


def _transposes(proto: onnx.ModelProto) -> str:
    ops = Counter(node.op_type for node in proto.graph.node)
    return f"{ops['Transpose']} Transpose of {sum(ops.values())} nodes"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="Keras .h5 (default: the Lab-3 BadNet)")
    parser.add_argument("--images", type=int, default=11547, help="batch of random images (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after a warm-up (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="onnx2torch")  # raw graph's Slice

    deepid = load_model(args.model, "cpu")
    if not isinstance(deepid, DeepID):
        parser.error(f"{args.model} is not a DeepID model")
    keras_model = load_keras(args.model)
    raw, simplified = to_onnx(keras_model, args.model, optimize=False), to_onnx(keras_model, args.model)
    images = parity.random_images(args.images, DEEPID_INPUT_SHAPE, args.seed)
    raw_session = parity.onnxruntime_session(raw.SerializeToString())
    session = parity.onnxruntime_session(simplified.SerializeToString())
    raw_module, module = onnx_to_torch(raw, args.model).eval(), onnx_to_torch(simplified, args.model).eval()
    deepid_cl = load_model(args.model, "cpu").to(memory_format=torch.channels_last)
    runners = {
        "keras predict": lambda batch: parity.keras_probs(keras_model, batch),
        "onnxruntime (raw graph)": lambda batch: parity.onnxruntime_probs(raw_session, batch),
        "onnxruntime": lambda batch: parity.onnxruntime_probs(session, batch),
        "onnx2torch (raw graph)": lambda batch: parity.torch_probs(raw_module, batch),
        "onnx2torch": lambda batch: parity.torch_probs(module, batch),
        "named DeepID": lambda batch: parity.torch_probs(deepid, batch),
        "named DeepID channels_last": lambda batch: parity.torch_probs(deepid_cl, batch),
    }
    seconds, outputs = _time_side_by_side(runners, images, args.repeats)
    print(f"{args.model.name}: {args.images} random images, batch size {parity.BATCH_SIZE}, "
          f"best of {args.repeats} round-robin repeats after a warm-up; CPU, {torch.get_num_threads()} threads")
    print(f"tf2onnx graph: {_transposes(raw)}; after simplify: {_transposes(simplified)}")
    print(f"{'backend':<26} {'images/s':>10} {'vs keras':>9} {'max |p - keras|':>16}")
    for name in runners:
        diff = float(np.abs(outputs["keras predict"] - outputs[name]).max())
        print(f"{name:<26} {args.images / seconds[name]:>10.0f} "
              f"{seconds['keras predict'] / seconds[name]:>8.2f}x {diff:>16.2g}")
    slowdown = seconds["named DeepID"] / seconds["keras predict"]
    verdict = "holds" if slowdown <= SLOWDOWN_LIMIT else "FAILS"
    print(f"named DeepID takes {slowdown:.2f}x Keras' time: the <= {SLOWDOWN_LIMIT}x requirement {verdict}")
    for name, graph_module in (("raw graph", raw_module), ("simplified", module)):
        layout, total = _layout_share(graph_module, images)
        print(f"onnx2torch {name}: transposes and reshape plumbing take {layout * 1e3:.0f} ms "
              f"of {total:.2f} s per pass ({layout / total:.2%}), timed node by node")

if __name__ == "__main__":
    main()
