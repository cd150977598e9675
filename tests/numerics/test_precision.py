"""Float32 precision: the context sets and restores torch's flags; on CUDA the sweep equals CPU's.

The ``gpu`` tests run by default and skip with a reason where there is no CUDA device.
"""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bdpruning
from bdpruning.numerics import precision
from bdpruning.models import DeepID
from bdpruning.numerics.precision import precision_context, precision_record, runs_in_precision_context
from bdpruning.evaluation.predict import predict_labels
from bdpruning.sweep.lab import run_sweep
from helpers.data import write_h5_set

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")

#: The new-API settings, by name, as ``torch.backends`` attribute paths.
NEW_API = {"cudnn_conv": "cudnn.conv", "cudnn_rnn": "cudnn.rnn", "cuda_matmul": "cuda.matmul",
           "mkldnn_conv": "mkldnn.conv", "mkldnn_matmul": "mkldnn.matmul"}


def _setting(path: str):
    target = torch.backends
    for part in path.split("."):
        target = getattr(target, part)
    return target


def _legacy(getter):
    try:
        return getter()
    except RuntimeError:  # torch refuses to read a legacy flag that disagrees with the new settings
        return "unreadable"


def _flags() -> dict:
    """Every setting, new and legacy, as a caller would read it."""
    flags = {name: _setting(path).fp32_precision for name, path in NEW_API.items()}
    flags["legacy cudnn.allow_tf32"] = _legacy(lambda: torch.backends.cudnn.allow_tf32)
    flags["legacy cuda.matmul.allow_tf32"] = _legacy(lambda: torch.backends.cuda.matmul.allow_tf32)
    flags["legacy matmul precision"] = _legacy(torch.get_float32_matmul_precision)
    return flags


@pytest.fixture(autouse=True)
def restore_torch_flags():
    saved = precision._read()
    yield
    precision._apply(saved)


def _set_new(**values: str) -> None:
    for name, value in values.items():
        _setting(NEW_API[name]).fp32_precision = value


CALLERS = {  # what a caller may have done before calling bdpruning
    "torch defaults": lambda: None,
    "legacy TF32 on": lambda: (setattr(torch.backends.cudnn, "allow_tf32", True),
                               setattr(torch.backends.cuda.matmul, "allow_tf32", True)),
    "legacy TF32 off": lambda: (setattr(torch.backends.cudnn, "allow_tf32", False),
                                torch.set_float32_matmul_precision("highest")),
    "new API TF32 on": lambda: _set_new(cudnn_conv="tf32", cudnn_rnn="tf32", cuda_matmul="tf32"),
    "new API TF32 off": lambda: _set_new(cudnn_conv="ieee", cudnn_rnn="ieee", cuda_matmul="ieee"),
    "new API, conv and rnn differ": lambda: _set_new(cudnn_conv="ieee"),
    "oneDNN bf16": lambda: _set_new(mkldnn_conv="bf16", mkldnn_matmul="bf16"),
}


def _assert_restored(before: dict) -> None:
    """New settings exactly as before; legacy flags as before wherever torch could read them then."""
    after = _flags()
    assert {k: v for k, v in after.items() if before[k] != "unreadable"} == \
        {k: v for k, v in before.items() if v != "unreadable"}


@pytest.mark.parametrize("caller", CALLERS)
def test_fp32_inside_and_the_callers_settings_back_after(caller):
    CALLERS[caller]()
    before = _flags()
    with precision_context() as record:
        inside = _flags()
        assert precision_record() == record
    assert {name: inside[name] for name in NEW_API} == dict.fromkeys(NEW_API, "ieee")
    assert inside["legacy cudnn.allow_tf32"] is False and inside["legacy cuda.matmul.allow_tf32"] is False
    assert inside["legacy matmul precision"] == "highest"  # readable: no "mix of legacy and new APIs"
    assert record["tf32"] is False and record["api"] == "fp32_precision"
    _assert_restored(before)


@pytest.mark.parametrize("caller", CALLERS)
def test_tf32_true_allows_tf32_on_cuda_and_leaves_cpu_alone(caller):
    CALLERS[caller]()
    before = _flags()
    with precision_context(tf32=True) as record:
        inside = _flags()
    assert (inside["cudnn_conv"], inside["cudnn_rnn"], inside["cuda_matmul"]) == ("tf32", "tf32", "tf32")
    assert (inside["mkldnn_conv"], inside["mkldnn_matmul"]) == (before["mkldnn_conv"], before["mkldnn_matmul"])
    assert inside["legacy cudnn.allow_tf32"] is True and inside["legacy cuda.matmul.allow_tf32"] is True
    assert record["tf32"] is True and record["cudnn_conv"] == "tf32"
    _assert_restored(before)


@pytest.mark.parametrize("tf32", [False, True])
def test_settings_come_back_after_an_exception(tf32):
    CALLERS["new API TF32 on"]()
    before = _flags()
    with pytest.raises(ZeroDivisionError):
        with precision_context(tf32):
            1 / 0
    _assert_restored(before)


def test_nested_contexts_restore_the_outer_one():
    with precision_context(tf32=True):
        outer = _flags()
        with precision_context():
            assert _flags()["cudnn_conv"] == "ieee"
        assert _flags() == outer


def test_torch_without_the_new_api_gets_the_legacy_flags(monkeypatch):
    monkeypatch.setattr(precision, "_objects", lambda: {})  # as on torch < 2.9
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    with precision_context() as record:
        assert torch.backends.cudnn.allow_tf32 is False and torch.get_float32_matmul_precision() == "highest"
    assert record == {**record, "api": "legacy", "tf32": False, "cudnn_conv": "ieee", "cuda_matmul": "ieee"}
    assert torch.backends.cudnn.allow_tf32 is True and torch.get_float32_matmul_precision() == "high"
    with precision_context(tf32=True) as record:
        assert record["tf32"] is True and torch.backends.cudnn.allow_tf32 is True


def test_record_is_json_and_describes_the_context():
    record = precision_record()
    assert json.loads(json.dumps(record)) == record and record["torch"] == torch.__version__
    assert precision_record(tf32=False)["tf32"] is False and precision_record(tf32=True)["tf32"] is True
    assert precision_record() == record  # asking about a context changes nothing


def test_decorated_functions_run_in_the_context_of_their_tf32_argument():
    @runs_in_precision_context
    def conv_setting(x: int, *, tf32: bool = False) -> str:
        return torch.backends.cudnn.conv.fp32_precision

    @runs_in_precision_context
    def positional(x: int, tf32: bool = False) -> str:
        return torch.backends.cudnn.conv.fp32_precision

    assert conv_setting(1) == "ieee" and conv_setting(1, tf32=True) == "tf32"
    assert positional(1, True) == "tf32" and positional(1) == "ieee"


# ---- the sweep on CUDA against CPU ------------------------------------------------------------

MODEL_SEED = 3  # random weights whose pool_3 channel means are far apart (see the fixture's test)
MARGIN = 1e-4  # images kept: top-1 logit ahead of the second by this fraction of the largest logit


def _seeded_deepid(seed: int) -> DeepID:
    """A 10-class DeepID with weights drawn by numpy (the same on every torch version)."""
    rng = np.random.default_rng(seed)
    model = DeepID(num_classes=10).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            fan_in = model.get_submodule(name.rsplit(".", 1)[0]).weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            parameter.copy_(torch.from_numpy(rng.uniform(-bound, bound, tuple(parameter.shape))))
    return model


def _images(seed: int, count: int) -> np.ndarray:
    rng = np.random.default_rng(seed)  # a random colour per image plus noise
    return (rng.integers(0, 256, (count, 3, 1, 1)) * 0.8 + rng.integers(0, 50, (count, 3, 55, 47))).astype(np.uint8)


def _float64_pool_3(model: DeepID, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv_3``'s pre-activation and ``pool_3``'s output, in float64."""
    x = torch.from_numpy(images).double()
    x = model.pool_1(F.relu(model.conv_1(x)))
    x = model.pool_2(F.relu(model.conv_2(x)))
    pre = model.conv_3(x)
    return pre, model.pool_3(F.relu(pre))


def _float64_logits(model: DeepID, features: torch.Tensor) -> torch.Tensor:
    branch_2 = model.fc_2(F.relu(model.conv_4(features)).flatten(1))
    return model.output(F.relu(model.fc_1(features.flatten(1)) + branch_2))


def _float64_order(features: torch.Tensor) -> list[int]:
    means = features.mean(dim=(0, 2, 3)).tolist()
    return sorted(range(len(means)), key=lambda c: (means[c], c))


def _float64_sweep(model: DeepID, features: torch.Tensor, order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 labels at every step (rows) and whether each image is at least MARGIN from a tie throughout."""
    labels, robust = [], torch.ones(len(features), dtype=torch.bool)
    for step in range(len(order) + 1):
        masked = features.clone()
        masked[:, order[:step]] = 0
        logits = _float64_logits(model, masked)
        top = logits.topk(2, dim=1).values
        robust &= (top[:, 0] - top[:, 1]) >= MARGIN * logits.abs().amax(dim=1)
        labels.append(logits.argmax(dim=1))
    return torch.stack(labels), robust


@pytest.fixture(scope="module")
def far_from_ties(tmp_path_factory):
    """A seeded DeepID and clean/poisoned sets on which float32 cannot flip a channel's rank or a
    label: the reference is computed in float64 and images near a tie at any step are left out."""
    model = _seeded_deepid(MODEL_SEED)
    model64 = copy.deepcopy(model).double()
    folder = tmp_path_factory.mktemp("precision")
    with torch.no_grad():
        clean = _images(1000 + MODEL_SEED, 400)
        pre, features = _float64_pool_3(model64, clean)
        order = _float64_order(features)
        labels, robust = _float64_sweep(model64, features, order)
        clean, labels, pre, features = clean[robust.numpy()], labels[:, robust], pre[robust], features[robust]
        poisoned = _images(2000 + MODEL_SEED, 300)
        poisoned_labels, poisoned_robust = _float64_sweep(model64, _float64_pool_3(model64, poisoned)[1], order)
        poisoned = poisoned[poisoned_robust.numpy()]
    means = features.mean(dim=(0, 2, 3))
    live = means[means > 0].sort().values
    return SimpleNamespace(
        model=model, order=order, clean_order=_float64_order(features),
        clean=write_h5_set(folder / "clean.h5", clean, labels[0].numpy()),  # the baseline is 100 %
        poisoned=write_h5_set(folder / "poisoned.h5", poisoned, np.zeros(len(poisoned), dtype=np.int64)),
        clean_correct=(labels == labels[0]).sum(1).tolist(),
        poisoned_hits=(poisoned_labels[:, poisoned_robust] == 0).sum(1).tolist(),
        smallest_gap=((live[1:] - live[:-1]) / live[-1]).min().item(),
        smallest_live=(live[0] / live[-1]).item(),
        dead_margin=(pre[:, means == 0].amax(dim=(0, 2, 3)).max() / pre.abs().max()).item(),
    )


def _sweep(setup, device: str, **options):
    model = copy.deepcopy(setup.model).to(device)
    clean, poisoned = bdpruning.read_h5_dataset(setup.clean, 10), bdpruning.read_h5_dataset(setup.poisoned, 10)
    return run_sweep(model, clean, poisoned, full_sweep=True, batch_size=128, **options)


def _counts(result, clean: int, poisoned: int) -> tuple[list[int], list[int]]:
    return ([round(s.clean_accuracy * clean / 100) for s in result.all_steps],
            [round(s.attack_success_rate * poisoned / 100) for s in result.all_steps])


@pytest.mark.slow
def test_the_gpu_comparison_is_far_from_ties_and_cpu_float32_equals_float64(far_from_ties):
    setup = far_from_ties
    clean_n, poisoned_n = len(bdpruning.read_h5_dataset(setup.clean)), len(bdpruning.read_h5_dataset(setup.poisoned))
    assert clean_n >= 300 and poisoned_n >= 200
    assert setup.smallest_gap > 1e-4 and setup.smallest_live > 1e-4  # channel means far apart
    assert setup.dead_margin < -1e-3  # dead channels stay dead on any device
    assert setup.clean_order == setup.order  # leaving images out did not change the ranking
    result = _sweep(setup, "cpu")
    assert result.ranking.order == setup.order
    assert _counts(result, clean_n, poisoned_n) == (setup.clean_correct, setup.poisoned_hits)
    assert all(hit.reached for hit in result.thresholds)  # the comparison covers every threshold
    assert result.precision["tf32"] is False


@pytest.mark.gpu
@needs_cuda
def test_cuda_sweep_equals_the_cpu_sweep_step_by_step(far_from_ties):
    setup = far_from_ties
    before = _flags()
    cpu, cuda = _sweep(setup, "cpu"), _sweep(setup, "cuda")
    assert cuda.ranking.order == cpu.ranking.order
    assert cuda.all_steps == cpu.all_steps  # the same correct counts (clean and poisoned) at every step
    assert cuda.thresholds == cpu.thresholds
    assert cuda.precision["tf32"] is False
    clean = bdpruning.read_h5_dataset(setup.clean, 10)
    assert torch.equal(predict_labels(copy.deepcopy(setup.model).cuda(), clean),
                       predict_labels(setup.model, clean))
    assert _flags() == before  # torch's default (cuDNN TF32 on) is back


@pytest.mark.gpu
@needs_cuda
def test_fp32_sweep_equals_cpu_although_the_caller_allows_tf32(far_from_ties):
    setup = far_from_ties
    CALLERS["new API TF32 on"]()
    before = _flags()
    cpu = _sweep(setup, "cpu")
    allowed = _sweep(setup, "cuda", tf32=True)  # may or may not differ: nothing is asserted about it
    differing = sum(a != b for a, b in zip(allowed.all_steps, cpu.all_steps))
    print(f"with TF32 allowed, {differing} of {len(cpu.all_steps)} steps differ from CPU")
    exact = _sweep(setup, "cuda", tf32=False)
    assert exact.ranking.order == cpu.ranking.order and exact.all_steps == cpu.all_steps
    assert exact.thresholds == cpu.thresholds
    _assert_restored(before)
