"""The learned criteria at training speed (issue 20): an ANP iteration and an RNP recovering
step against the bare PyTorch passes they contain, for the same model and batches, measured
side by side in one run (``bench_speed.py`` calls :func:`learned_criteria_part`).

bdpruning's cost per iteration is the difference of two whole runs (``ANP.score`` with
``long`` and ``short`` iterations; RNP with as many recovering epochs as cover ``short`` and
``long`` steps) divided by the iterations between them, so the Trainer's start-up is left out
while everything per iteration (hooks, Lightning, data loading) stays in. The bare loop holds the
batches as tensors on the device and runs, per ANP iteration, what the authors' ``mask_train``
runs: forward, backward and a signed SGD step over one per-channel parameter per covered channel
(each conv's bias, or the BatchNorm's weight after it), then two forwards, one backward and an
SGD step; per RNP step one forward, backward and step. It starts with one untimed iteration
(as both runs of the difference do), so neither side pays a first call.

The machine is shared: each of ``repeats`` rounds runs the long run, the bare loop and the short
run in turn, so a busy spell slows both sides alike, and each of the three is the best of its
rounds (the spread of the per-round ratios is printed too).
"""

from __future__ import annotations

import copy
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


def _bare_seconds(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], iterations: int,
                  anp: bool) -> float:
    """Seconds per iteration of the bare loop, after one untimed iteration."""
    model = copy.deepcopy(model).train()
    parameters = _per_channel_parameters(model)
    optimizer = torch.optim.SGD(parameters, lr=1e-9, momentum=0.9)
    synchronize = torch.cuda.synchronize if batches[0][0].is_cuda else (lambda: None)
    for i in range(iterations + 1):
        if i == 1:
            synchronize()
            start = time.perf_counter()
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
    synchronize()
    return (time.perf_counter() - start) / iterations


def _run_seconds(make, model: nn.Module, data) -> float:
    start = time.perf_counter()
    make().score(model, data)
    return time.perf_counter() - start


def learned_criteria_part(model_path: Path, clean_path: Path, accelerator: str = "cpu", images: int = 500,
                          batch: int = 128, short: int = 5, long: int = 45, repeats: int = 3) -> dict[str, float]:
    """Print and return the ratios ``ANP iteration / bare`` and ``RNP step / bare`` (best of ``repeats``)."""
    device = "cuda" if accelerator in ("gpu", "cuda") else "cpu"
    model = bdpruning.load_model(model_path, device=device)
    data = bdpruning.read_h5_dataset(clean_path)
    tensors = [data[i] for i in range(min(images, len(data)))]
    stacked = torch.stack([torch.as_tensor(t[0]) for t in tensors]).float().to(device)
    labels = torch.as_tensor([int(t[1]) for t in tensors]).to(device)
    batches = list(zip(stacked.split(batch), labels.split(batch)))
    per_epoch = len(batches)
    options = {"accelerator": accelerator, "progress": False}
    clean = (stacked.cpu(), labels.cpu())
    anp = lambda n: ANP(iterations=n, images=None, batch_size=batch, trainer_options=options)  # noqa: E731
    rnp = lambda n: RNP(unlearn_epochs=1, stop_accuracy=0.99, recover_epochs=n, images=None,  # noqa: E731
                        batch_size=batch, trainer_options=options)
    rnp_short, rnp_long = 1, 1 + max(1, (long - short) // per_epoch)
    results = {}
    for name, make, lo, hi, steps, anp_passes in (
            ("ANP iteration", anp, short, long, long - short, True),
            ("RNP recovering step", rnp, rnp_short, rnp_long, (rnp_long - rnp_short) * per_epoch, False)):
        rounds = [(_run_seconds(lambda: make(hi), model, clean), _bare_seconds(model, batches, steps, anp_passes),
                   _run_seconds(lambda: make(lo), model, clean)) for _ in range(repeats)]
        longest, bare, shortest = (min(column) for column in zip(*rounds))
        measured = (longest - shortest) / steps
        results[name] = measured / bare
        spread = sorted((hi_s - lo_s) / steps / bare_s for hi_s, bare_s, lo_s in rounds)
        print(f"  {name + ' vs bare step':<34} {1000 * measured:7.1f} ms vs {1000 * bare:7.1f} ms: "
              f"{measured / bare:5.2f}x (target <= {TARGET}x: {'met' if measured / bare <= TARGET else 'MISSED'}; "
              f"best of {repeats} interleaved, {steps} steps; rounds {spread[0]:.2f}x to {spread[-1]:.2f}x)")
    return results
