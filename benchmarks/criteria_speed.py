"""The learned criteria at training speed (issue 20): an ANP iteration and an RNP recovering
step against the bare PyTorch passes they contain, for the same model and batches, measured
side by side in one run (``bench_speed.py`` calls :func:`learned_criteria_part`).

Both sides are timed the same way, from inside: a forward pre-hook on the model's first conv
(deep-copied with it into ``ANP.score``, RNP's recovering stage and the bare loop) notes the time
of every forward, so every ``len(batches)`` steps (one pass over the batches) give one window, whose
time per step holds everything in the loop (hooks, Lightning, data loading, the epoch's end) and
nothing of the Trainer's start-up. A run's first window (first calls) and last are left out.

The bare loop holds the batches as tensors on the device and runs, per ANP iteration, what the
authors' ``mask_train`` runs: forward, backward and a signed SGD step over one per-channel
parameter per covered channel (each conv's bias, or the BatchNorm's weight after it), then two
forwards, one backward and an SGD step; per RNP step one forward, backward and step.

The machine is shared, and others' work only ever slows a window: ``repeats`` rounds alternate
bdpruning and the bare loop (which goes first alternates too), and each side's figure is its
fastest window over every round (the ratio of the medians is printed too).
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import bdpruning
from bdpruning.criteria import ANP, RNP
from bdpruning.pruning.finetuning import finetune_loss
from bdpruning.pruning.masks import following_batchnorm

TARGET = 1.2


def _per_channel_parameters(model: nn.Module) -> list[nn.Parameter]:
    """One per-channel parameter per conv: the BatchNorm weight after it, else its bias."""
    model.requires_grad_(False)
    chosen = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            norm = following_batchnorm(model, name)
            parameter = model.get_submodule(norm).weight if norm else module.bias
            parameter.requires_grad_(True)
            chosen.append(parameter)
    return chosen


def _forward_times(model: nn.Module) -> list[float]:
    """A list that the times of ``model``'s first conv's forwards will be appended to (on a GPU,
    once the work queued before each has finished)."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    times: list[float] = []

    def note(_module: nn.Module, inputs: tuple) -> None:
        if inputs[0].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    first.register_forward_pre_hook(note)  # a function: deep copies of the model share it and the list
    return times


def _step_seconds(times: list[float], steps: int, forwards: int, window: int) -> list[float]:
    """Seconds per step of each ``window``-step window of the last ``steps`` steps (``forwards``
    forwards each), from the start of one step to the start of the step ``window`` later; the
    first window is left out, and the last, which no later forward closes."""
    starts = times[len(times) - steps * forwards::forwards]
    return [(starts[i + window] - starts[i]) / window for i in range(window, len(starts) - window, window)]


def _bare_loop(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int, anp: bool) -> None:
    """The bare passes of ``steps`` ANP iterations (or RNP steps), cycling over ``batches``."""
    model = copy.deepcopy(model).train()
    parameters = _per_channel_parameters(model)
    optimizer = torch.optim.SGD(parameters, lr=1e-9, momentum=0.9)
    for i in range(steps):
        images, labels = batches[i % len(batches)]
        if anp:
            optimizer.zero_grad()
            (-finetune_loss(model, images, labels)).backward()
            for p in parameters:
                p.grad.sign_()
            optimizer.step()
            optimizer.zero_grad()
            (0.2 * finetune_loss(model, images, labels) + 0.8 * finetune_loss(model, images, labels)).backward()
        else:
            optimizer.zero_grad()
            finetune_loss(model, images, labels).backward()
        optimizer.step()


def learned_criteria_part(model_path: Path, clean_path: Path, accelerator: str = "cpu", images: int = 500,
                          batch: int = 128, epochs: int = 10, repeats: int = 3) -> dict[str, float]:
    """Print and return the ratios ``ANP iteration / bare`` and ``RNP step / bare``: the fastest
    per-step times of ``epochs`` passes over the batches (plus the first and the last, left out)
    in each of ``repeats`` rounds."""
    device = "cuda" if accelerator in ("gpu", "cuda") else "cpu"
    model = bdpruning.load_model(model_path, device=device)
    data = bdpruning.read_h5_dataset(clean_path)
    tensors = [data[i] for i in range(min(images, len(data)))]
    stacked = torch.stack([torch.as_tensor(t[0]) for t in tensors]).float().to(device)
    labels = torch.as_tensor([int(t[1]) for t in tensors]).to(device)
    batches = list(zip(stacked.split(batch), labels.split(batch)))
    window = len(batches)
    steps = (epochs + 2) * window
    options = {"accelerator": accelerator, "progress": False}
    clean = (stacked.cpu(), labels.cpu())
    ours = {"ANP iteration": lambda: ANP(iterations=steps, images=None, batch_size=batch, trainer_options=options),
            "RNP recovering step": lambda: RNP(unlearn_epochs=1, stop_accuracy=0.99, recover_epochs=epochs + 2,
                                               images=None, batch_size=batch, trainer_options=options)}
    results = {}
    for name, make in ours.items():
        anp = name.startswith("ANP")
        forwards = 3 if anp else 1
        samples: dict[str, list[float]] = {"ours": [], "bare": []}
        for r in range(repeats):
            for side in (("ours", "bare") if r % 2 == 0 else ("bare", "ours")):
                timed = copy.deepcopy(model)
                times = _forward_times(timed)
                if side == "ours":
                    make().score(timed, clean)
                else:
                    _bare_loop(timed, batches, steps, anp)
                samples[side] += _step_seconds(times, steps, forwards, window)
        measured, bare = min(samples["ours"]), min(samples["bare"])
        median = statistics.median(samples["ours"]) / statistics.median(samples["bare"])
        results[name] = measured / bare
        print(f"  {name + ' vs bare step':<34} {1000 * measured:7.1f} ms vs {1000 * bare:7.1f} ms: "
              f"{measured / bare:5.2f}x (target <= {TARGET}x: {'met' if measured / bare <= TARGET else 'MISSED'}; "
              f"best of {len(samples['ours'])} {window}-step windows in {repeats} interleaved rounds; "
              f"medians {median:.2f}x)")
    return results
