"""Speed to the hardware's limit, side by side in one run (issue 14): CPU, GPU and start-up.

    .venv/bin/python benchmarks/bench_speed.py [--images 4000] [--repeats 3] [--skip-startup]
    .venv/bin/python benchmarks/bench_speed.py --only gpu       # the GPU part alone (skips without CUDA)

Data: the demo's real MNIST digits in the course's format and the shipped demo BadNet (DeepID,
built into --cache by ``bdpruning.demo.build_demo``), tiled to the sizes asked for.

CPU (each at 2 threads and at every core this process may use; best of --repeats, the
contenders interleaved so a busy machine slows all alike; batch 256):
Keras ``predict`` (NHWC float32, its native input) at batch 256 and at the cache-sized batch
bdpruning's CPU inference uses (``CPU_BATCH``, 64); the DeepID module as loaded on an NCHW
float32 tensor; its fast inference form (:mod:`bdpruning.graph.fused`: fused conv+ReLU, NHWC)
at both batches; the onnx2torch module as converted and in its fast form; ``predict_labels`` on
the HDF5 set; the 60-step fast sweep (ranking included) on the HDF5 set. Ratios are to Keras'
faster time, "one forward" is the fast form's faster time; each ratio is printed as the ratio of
the best times and as the median over the rounds of the ratio within a round (targets are judged
on the median: a slow moment of a shared machine slows the runners of one round alike).

GPU (when CUDA is present, at 11,547 and 115,470 images): the bare model's throughput on a
float32 device tensor (NCHW and channels-last), ``predict_labels`` on the HDF5 set, the
Lightning evaluation, the 60-step sweep; peak GPU memory. Ratios: predict_labels' throughput
over the bare model's (target >= 0.70), the sweep's time over one bare forward (target <= 2).

Start-up (whole processes, best of 3 interleaved): ``python -c 'import torch'``,
``bdprune --help``, ``bdprune evaluate`` on 11,547 images (target: within 3x import torch).

Every number is computed inside ``bdpruning.numerics.precision.precision_context()`` (IEEE fp32).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported: no start-up chatter

import h5py
import numpy as np
import torch

import bdpruning
from bdpruning.graph.fused import CPU_BATCH, inference_module
from bdpruning.numerics.precision import precision_context
from bdpruning.evaluation.predict import predict_labels
from bdpruning.criteria.activation import MeanActivation
from bdpruning.data.forms import as_image_data
from bdpruning.sweep.lab import run_sweep
from bdpruning.sweep.loop import run_defense
from bdpruning.sweep.split_engine import SplitEngine

ROOT = Path(__file__).resolve().parents[1]
BATCH = 256
TARGETS = {"forward": 0.9, "sweep": 2.0, "feed": 1.1, "shared": 1.2, "gpu_predict": 0.70, "gpu_sweep": 2.0,
           "startup": 3.0}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def rounds(runners: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each runner in each round; a warm-up each, then ``repeats`` rounds in
    round-robin order (a busy moment slows the runners of one round alike)."""
    for run in runners.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def best_of(runners: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best seconds of each runner over :func:`rounds`."""
    return {name: min(times) for name, times in rounds(runners, repeats).items()}


def round_ratio(times: dict[str, list[float]], names: list[str], bases: list[str]) -> float:
    """The median over rounds of the fastest of ``names`` over the fastest of ``bases`` in the
    same round: side by side in time, so a slow moment of the machine cancels out."""
    ratios = [min(times[n][r] for n in names) / min(times[b][r] for b in bases)
              for r in range(len(times[names[0]]))]
    return statistics.median(ratios)


def tiled_set(source: Path, count: int, directory: Path) -> Path:
    """``source``'s images and labels repeated to ``count``, as an HDF5 set in ``directory``."""
    path = directory / f"{source.stem}_{count}.h5"
    if not path.exists():
        with h5py.File(source, "r") as handle:
            data, label = handle["data"][()], handle["label"][()]
        reps = -(-count // len(label))
        with h5py.File(path, "w") as handle:
            handle["data"] = np.concatenate([data] * reps)[:count]
            handle["label"] = np.concatenate([label] * reps)[:count]
    return path


def _forward(module: Callable, images: torch.Tensor, batch: int = BATCH) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([module(images[s:s + batch]) for s in range(0, len(images), batch)])


def _keras(model_path: Path, images: np.ndarray):
    try:
        import keras
    except ImportError:
        return None
    model = keras.models.load_model(model_path, compile=False)
    nhwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1)).astype(np.float32)
    # at the common batch, and at the cache-sized one bdpruning's CPU inference uses
    return tuple((lambda size=size: model.predict(nhwc, batch_size=size, verbose=0)) for size in (BATCH, CPU_BATCH))


def _onnx2torch(model_path: Path):
    try:
        from bdpruning.convert.keras_to_onnx import load_keras, to_onnx
        from bdpruning.models.onnx_graph import onnx_to_torch
    except ImportError:
        return None
    return onnx_to_torch(to_onnx(load_keras(model_path), model_path), model_path).eval()


def cpu_part(model_path: Path, data_path: Path, repeats: int) -> None:
    model = bdpruning.load_model(model_path, device="cpu").eval()
    dataset = bdpruning.read_h5_dataset(data_path)
    with h5py.File(data_path, "r") as handle:
        pixels = handle["data"][()]
    images = torch.from_numpy(pixels).float()
    fast = inference_module(model)
    # the fast form first, Keras between it and the others: no contender always follows Keras
    # (whose thread pool spins on for a moment after predict returns)
    runners: dict[str, Callable[[], object]] = {"DeepID fast form": lambda: _forward(fast, images)}
    keras_runs = _keras(model_path, pixels)
    if keras_runs is not None:
        runners["Keras predict"] = keras_runs[0]
        runners[f"Keras predict, batch {CPU_BATCH}"] = keras_runs[1]
    runners[f"DeepID fast form, {CPU_BATCH} a call"] = lambda: _forward(fast, images, CPU_BATCH)
    runners["DeepID as loaded (NCHW)"] = lambda: _forward(model, images)
    onnx_module = _onnx2torch(model_path)
    if onnx_module is not None:
        onnx_fast = inference_module(onnx_module)
        runners["onnx2torch as converted"] = lambda: _forward(onnx_module, images)
        runners["onnx2torch fast form"] = lambda: _forward(onnx_fast, images)
    runners["predict_labels (HDF5)"] = lambda: predict_labels(model, dataset, BATCH)
    steps = {}

    def sweep() -> None:
        steps["n"] = len(run_sweep(model, dataset, full_sweep=True).all_steps) - 1

    runners["sweep (rank + all steps)"] = sweep
    # issue 20: the shared loop with the lab's criterion (what every other criterion goes
    # through) against the lab's own call, and the split engine with and without its
    # incremental float64 update of the layers after the split
    runners["shared loop: run_defense(MeanActivation)"] = lambda: run_defense(
        model, MeanActivation(), dataset, thresholds=(2.0, 4.0, 10.0), full_sweep=True)
    runners["split engine, suffix re-runs"] = lambda: _split_engine_sweep(model, dataset, incremental=False)
    runners["split engine, incremental"] = lambda: _split_engine_sweep(model, dataset, incremental=True)
    reference = _forward(model, images).argmax(1)
    same = bool(torch.equal(_forward(fast, images).argmax(1), reference))
    threads = sorted({2, _cores()})
    saved = torch.get_num_threads()
    for count in threads:
        torch.set_num_threads(count)
        with precision_context():
            times = rounds(runners, repeats)
        seconds = {name: min(values) for name, values in times.items()}
        keras_s = [value for name, value in seconds.items() if name.startswith("Keras predict")]
        base = min(keras_s) if keras_s else seconds["DeepID as loaded (NCHW)"]
        base_name = "Keras predict's (the faster batch)" if keras_s else "DeepID as loaded"
        print(f"\nCPU, {count} threads ({_cores()} cores available), {len(images)} images, batch {BATCH}, "
              f"best of {repeats} interleaved; ratios are time / {base_name} time")
        for name, value in seconds.items():
            print(f"  {name:<40} {value:8.3f} s  {len(images) / value:9.0f} img/s  {value / base:6.2f}x")
        keras = [name for name in times if name.startswith("Keras predict")]
        forward = ["DeepID fast form", f"DeepID fast form, {CPU_BATCH} a call"]
        sweep, feed = ["sweep (rank + all steps)"], ["predict_labels (HDF5)"]

        def ratio(names: list[str], bases: list[str]) -> str:
            best = min(seconds[n] for n in names) / min(seconds[b] for b in bases)
            return f"best {best:.2f}x, per round {round_ratio(times, names, bases):.2f}x"

        print("  ratios: the best times' ratio, and the median over the rounds of the ratio within a round "
              "(targets are judged on the median)")
        if keras:
            _target(f"predict_labels <= {TARGETS['forward']}x Keras predict", ratio(feed, keras),
                    round_ratio(times, feed, keras), TARGETS["forward"])
            _target(f"{steps['n']}-step sweep <= {TARGETS['sweep']}x one Keras predict", ratio(sweep, keras),
                    round_ratio(times, sweep, keras), TARGETS["sweep"])
        print(f"  {steps['n']}-step sweep vs one forward (fast form, the faster batch): {ratio(sweep, forward)}")
        _target(f"predict_labels <= {TARGETS['feed']}x the fast form alone", ratio(feed, forward),
                round_ratio(times, feed, forward), TARGETS["feed"])
        shared = ["shared loop: run_defense(MeanActivation)"]
        _target(f"shared loop <= {TARGETS['shared']}x the lab's run_sweep", ratio(shared, sweep),
                round_ratio(times, shared, sweep), TARGETS["shared"])
        print(f"  split engine, incremental vs suffix re-runs: "
              f"{ratio(['split engine, incremental'], ['split engine, suffix re-runs'])}")
    torch.set_num_threads(saved)
    print(f"  fast form's labels equal the NCHW module's on all {len(images)} images: {same}")


def _target(what: str, shown: str, judged: float, limit: float) -> None:
    print(f"  target: {what}: {shown}: {'met' if judged <= limit else 'MISSED'}")


def _split_engine_sweep(model, dataset, incremental: bool) -> int:
    """The lab's sweep on the split engine alone (rank from the prefix, count every step)."""
    engine = SplitEngine(model, "conv_3", "pool_3", incremental=incremental)
    data = as_image_data(dataset)
    with torch.inference_mode():
        order = [("conv_3", c) for c in engine.means_and_cache(data, 1024, 1 << 30, False).ranking("pool_3").order]
        return engine.counts(data, order, range(len(order) + 1), 1024, False)[-1]


def gpu_part(model_path: Path, source: Path, directory: Path, repeats: int, sizes: list[int]) -> None:
    if not torch.cuda.is_available():
        print("\nGPU: no CUDA device here; GPU part skipped")
        return
    from bdpruning.lightning_modules.evaluation import evaluate_model

    device = torch.device("cuda")
    print(f"\nGPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version()}; IEEE fp32; best of {repeats} interleaved")
    model = bdpruning.load_model(model_path, device="cuda").eval()
    for count in sizes:
        path = tiled_set(source, count, directory)
        dataset = bdpruning.read_h5_dataset(path)
        with h5py.File(path, "r") as handle:
            on_device = torch.from_numpy(handle["data"][()]).to(device).float()
        cl = on_device.contiguous(memory_format=torch.channels_last)

        def sync(fn: Callable[[], object]) -> Callable[[], None]:
            return lambda: (fn(), torch.cuda.synchronize())

        torch.cuda.reset_peak_memory_stats()
        runners = {
            "bare model, NCHW device tensor": sync(lambda: _forward(model, on_device, 1024)),
            "bare model, channels-last": sync(lambda: _forward(model, cl, 1024)),
            "predict_labels (HDF5)": sync(lambda: predict_labels(model, dataset, 1024)),
            "Lightning evaluation": sync(lambda: evaluate_model(model, dataset, accelerator="gpu", devices=1,
                                                                batch_size=1024)),
            "sweep (rank + all steps)": sync(lambda: run_sweep(model, dataset, full_sweep=True)),
        }
        with precision_context():
            seconds = best_of(runners, repeats)
        bare = min(seconds["bare model, NCHW device tensor"], seconds["bare model, channels-last"])
        print(f"  {count} images; peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
        for name, value in seconds.items():
            print(f"    {name:<32} {value:8.4f} s  {count / value:11.0f} img/s  {value / bare:6.2f}x bare")
        ratio = bare / seconds["predict_labels (HDF5)"]
        print(f"    target: predict_labels >= {TARGETS['gpu_predict']:.0%} of bare throughput: {ratio:.0%} "
              f"{'met' if ratio >= TARGETS['gpu_predict'] else 'MISSED'}")
        ratio = seconds["sweep (rank + all steps)"] / bare
        print(f"    target: sweep <= {TARGETS['gpu_sweep']}x bare forward: {ratio:.2f}x "
              f"{'met' if ratio <= TARGETS['gpu_sweep'] else 'MISSED'}")


def startup_part(model_path: Path, data_path: Path, poisoned: Path, repeats: int) -> None:
    bdprune = [sys.executable, "-m", "bdpruning.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
            "bdprune --help": [*bdprune, "--help"],
            "bdprune evaluate (11,547 images)": [*bdprune, "evaluate", "--model", str(model_path), "--clean",
                                                 str(data_path), "--poisoned", str(poisoned), "--accelerator",
                                                 "cpu", "--out", str(Path(tmp) / "evaluate.json")],
        }

        def runner(command: list[str]) -> Callable[[], None]:
            return lambda: subprocess.run(command, check=True, capture_output=True, cwd=ROOT)

        seconds = best_of({name: runner(command) for name, command in commands.items()}, repeats)
    base = seconds["python -c 'import torch'"]
    print(f"\nStart-up (whole processes, CPU, best of {repeats} interleaved), ratios to import torch")
    for name, value in seconds.items():
        print(f"  {name:<34} {value:7.2f} s  {value / base:5.2f}x")
    ratio = seconds["bdprune evaluate (11,547 images)"] / base
    print(f"  target: bdprune evaluate <= {TARGETS['startup']}x import torch: {ratio:.2f}x "
          f"{'met' if ratio <= TARGETS['startup'] else 'MISSED'}")


def criteria_part(demo) -> None:
    """ANP iteration and RNP step vs the bare passes they contain (issue 20), on the CPU and a GPU."""
    from criteria_speed import learned_criteria_part

    for accelerator in ["cpu"] + (["gpu"] if torch.cuda.is_available() else []):
        print(f"\nLearned criteria on the {accelerator.upper()} (DeepID, batch 128, 500 clean images)")
        learned_criteria_part(demo.bd_net, demo.clean_valid, accelerator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000, help="CPU part: digits (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=ROOT / "data" / "generated" / "demo")
    parser.add_argument("--only", choices=["cpu", "gpu", "startup", "criteria"], help="run one part")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--gpu-sizes", type=int, nargs="+", default=[11547, 115470])
    args = parser.parse_args()
    from bdpruning.demo import build_demo

    demo = build_demo(args.cache)
    versions = f"torch {torch.__version__}, python {platform.python_version()}"
    try:
        import keras
        versions += f", keras {keras.__version__}"
    except ImportError:
        pass
    print(f"machine: {_cpu_name()}, {_cores()} cores available, torch threads {torch.get_num_threads()}; {versions}")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        source = demo.clean_train
        if args.only in (None, "cpu"):
            cpu_part(demo.bd_net, tiled_set(source, args.images, directory), args.repeats)
        if args.only in (None, "gpu"):
            gpu_part(demo.bd_net, source, directory, args.repeats, args.gpu_sizes)
        if args.only in (None, "criteria"):
            criteria_part(demo)
        if args.only == "startup" or (args.only is None and not args.skip_startup):
            startup_part(demo.bd_net, tiled_set(source, 11547, directory), demo.poisoned_test, args.repeats)


if __name__ == "__main__":
    main()
