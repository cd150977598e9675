"""Latency of a repaired model B', masked vs compact, side by side in one run (CPU).

B' is loaded and masked (its pruned channels from the masks, or its all-zero ``conv_3``
channels), then compacted with :func:`bdpruning.pruning.compaction.compact_model`. Both run the same
seeded random 0..255 images in batches (PyTorch, and onnxruntime on each one's exported ONNX
graph when installed): a warm-up, then the best of a few round-robin repeats. Prints the
milliseconds per batch, the compact/masked ratio, parameters and FLOPs, and the largest output
difference.

    .venv/bin/python benchmarks/bench_compact.py [--model B'] [--images 4096] [--batch 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bdpruning.pruning.compaction import compact_model, model_cost
from bdpruning.convert import parity
from bdpruning.models.loading import load_model
from bdpruning.pruning.masks import prune_channels, pruned_selection
from bdpruning.models.onnx_graph import export_onnx
from bdpruning.models import model_info

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared" / "models" / "lab3_pruned_2pct_full.h5"


def _masked(path: str) -> torch.nn.Module:
    model = load_model(path, device="cpu")
    for layer, channels in pruned_selection(model).items():
        prune_channels(model, layer, channels)
    return model


def _torch_runner(model: torch.nn.Module, batch: int) -> Callable[[np.ndarray], np.ndarray]:
    @torch.inference_mode()
    def run(images: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(images)
        return torch.cat([model(tensor[i:i + batch]) for i in range(0, len(tensor), batch)]).numpy()
    return run


def _onnx_runner(model: torch.nn.Module, batch: int) -> Callable[[np.ndarray], np.ndarray] | None:
    try:
        import onnxruntime  # noqa: F401 (the [convert] extra)
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, Path(tmp) / "model.onnx", model_info(model).input_shape)
        session = parity.onnxruntime_session((Path(tmp) / "model.onnx").read_bytes())

    def run(images: np.ndarray) -> np.ndarray:
        return np.concatenate([session.run(None, {"input": images[i:i + batch]})[0]
                               for i in range(0, len(images), batch)])
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="repaired model (default: the Lab-3 2 %% B')")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    masked = _masked(args.model)
    compact = _masked(args.model)
    groups = compact_model(compact)
    images = parity.random_images(args.images, model_info(masked).input_shape, seed=0)
    runners = {"torch masked": _torch_runner(masked, args.batch), "torch compact": _torch_runner(compact, args.batch)}
    onnx_masked, onnx_compact = _onnx_runner(masked, args.batch), _onnx_runner(compact, args.batch)
    if onnx_masked is not None:
        runners.update({"onnxruntime masked": onnx_masked, "onnxruntime compact": onnx_compact})

    for run in runners.values():  # warm-up
        run(images[: args.batch])
    seconds, outputs = dict.fromkeys(runners, float("inf")), {}
    for _ in range(args.repeats):  # round-robin, so a busy machine slows every runner alike
        for name, run in runners.items():
            start = time.perf_counter()
            outputs[name] = run(images)
            seconds[name] = min(seconds[name], time.perf_counter() - start)

    before, after = model_cost(masked), model_cost(compact)
    print(f"model {args.model}: removed {[(g.layer, len(c)) for g, (_, c) in zip(groups, model_info(compact).removed)]}")
    print(f"parameters {before.parameters:,} -> {after.parameters:,} ({after.parameters / before.parameters:.3f}x); "
          f"FLOPs/image {before.flops:,} -> {after.flops:,} ({after.flops / before.flops:.3f}x)")
    batches = -(-args.images // args.batch)
    for name, value in seconds.items():
        print(f"{name:<20} {1000 * value / batches:8.2f} ms per batch of {args.batch}")
    for backend in ("torch", "onnxruntime"):
        if f"{backend} masked" in seconds:
            ratio = seconds[f"{backend} masked"] / seconds[f"{backend} compact"]
            diff = np.abs(outputs[f"{backend} masked"] - outputs[f"{backend} compact"]).max()
            print(f"{backend}: compact is {ratio:.2f}x faster than masked (max abs output diff {diff:.2g})")


if __name__ == "__main__":
    main()
