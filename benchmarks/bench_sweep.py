"""Benchmark: the fast pruning sweep vs one forward pass and vs the naive sweep, in one run.

    .venv/bin/python benchmarks/bench_sweep.py [--images 11547] [--model ../shared/models/lab3_bd_weights.h5]
    .venv/bin/python benchmarks/bench_sweep.py --model data/generated/demo/bd_net.h5 \
        --data data/generated/demo/clean_valid.h5

The 11,547 inputs are seeded noisy copies of the two real Lab-3 face crops in ../shared/images
(the real validation set is not available), so the net's channels are as sparse as on faces.
Prints seconds and the ratios measured side by side: sweep / forward (target <= 3) and
naive / sweep (the speed-up; the reference procedure costs 61 forward passes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

import bdpruning
from bdpruning.evaluation.predict import predict_labels
from bdpruning.sweep.lab import naive_sweep_predictions, run_sweep

SHARED = Path(__file__).resolve().parents[2] / "shared"


def faces(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    names = ("clean_test_1.png", "sunglass_poisoned_1.png")
    base = [np.asarray(Image.open(SHARED / "images" / f).convert("RGB")).transpose(2, 0, 1) for f in names]
    rng = np.random.default_rng(seed)
    stack = np.stack([base[i % 2] for i in range(n)]).astype(np.int16)
    shifted = np.roll(stack, rng.integers(-2, 3), axis=3)
    data = np.clip(shifted + rng.integers(-40, 40, stack.shape), 0, 255).astype(np.uint8)
    return data, np.where(np.arange(n) % 2 == 0, 860, 0)


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=11547)
    parser.add_argument("--model", default=str(SHARED / "models" / "lab3_bd_weights.h5"))
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--data", help="an HDF5 validation set (e.g. the demo's clean_valid.h5), "
                                       "tiled to --images; default: noisy copies of the real face crops")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = bdpruning.load_model(args.model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "valid.h5"
        if args.data:
            with h5py.File(args.data, "r") as source:
                reps = -(-args.images // len(source["label"]))
                data = np.concatenate([source["data"][()]] * reps)[: args.images]
                labels = np.concatenate([source["label"][()]] * reps)[: args.images]
        else:
            data, labels = faces(args.images)
        with h5py.File(path, "w") as handle:
            handle["data"], handle["label"] = data, labels
        dataset = bdpruning.read_h5_dataset(path, bdpruning.model_info(model).num_classes)
        predict_labels(model, dataset, args.batch_size)  # warm-up
        forward = best_of(args.repeats, lambda: predict_labels(model, dataset, args.batch_size))
        result = None

        def sweep() -> None:
            nonlocal result
            result = run_sweep(model, dataset, full_sweep=True, batch_size=args.batch_size)

        fast = best_of(args.repeats, sweep)
        steps = len(result.ranking.order)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} images, {steps} steps")
        print(f"one forward pass           {forward:8.2f} s")
        print(f"fast sweep (rank + {steps} steps) {fast:8.2f} s   = {fast / forward:5.2f} x one forward (target <= 3)")
        if not args.skip_naive:
            naive = best_of(1, lambda: naive_sweep_predictions(model, dataset, result.ranking.order,
                                                               batch_size=args.batch_size))
            print(f"naive sweep (rank-free)    {naive:8.2f} s   = {naive / forward:5.2f} x one forward")
            print(f"speed-up of the fast sweep over the naive sweep: {naive / fast:5.1f} x")


if __name__ == "__main__":
    main()
