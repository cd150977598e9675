"""The fast paths compute what the plain ones do: fused, channels-last inference forms, data
resident on the device, one-process evaluation without Lightning (issue 14)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import bdpruning
from bdpruning.evaluation.local_counts import count_evaluation, count_goodnets
from bdpruning.data.forms import as_image_data
from bdpruning.graph.fused import ConvReLU, inference_module
from bdpruning.data.feed import model_batches
from bdpruning.evaluation.predict import predict_labels
from bdpruning.numerics.roundoff import float64_reference
from conftest import BD_WEIGHTS, ROOT, safe_noisy_faces, write_h5_set


def _reference_labels(model: nn.Module, images: np.ndarray) -> list[int]:
    return float64_reference(model, np.asarray(images, np.float32)).logits.argmax(1).tolist()


@pytest.fixture
def safe_set(tmp_path, face_images, nets, always_7):
    """11 images (odd) whose labels no float32 round-off can change under B, B' or always-7."""
    images, labels = safe_noisy_faces(face_images, 11, [*nets, always_7])
    return write_h5_set(tmp_path / "safe.h5", images, labels), images, labels


def _fused(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, ConvReLU)]


def test_the_fast_form_fuses_every_conv_relu_and_gives_the_float64_labels(nets, safe_set):
    bd, _ = nets
    _, images, _ = safe_set
    labels = _reference_labels(bd, images)
    fast = inference_module(bd)
    assert len(_fused(fast.module)) == 4 and fast.channels_last
    with torch.inference_mode():
        fast_labels = fast(torch.from_numpy(images).float()).argmax(1)
    assert fast_labels.tolist() == labels
    assert predict_labels(bd, safe_set[0], batch_size=4).tolist() == labels


def test_hooked_and_masked_layers_are_not_fused_and_hooks_still_fire(nets, safe_set):
    bd, repaired = nets  # repaired: conv_3 masked (a forward pre-hook)
    seen = []
    handle = bd.pool_3.register_forward_hook(lambda *args: seen.append(1))
    conv_hook = bd.conv_2.register_forward_hook(lambda *args: seen.append(2))
    try:
        fast = inference_module(bd)
        assert "conv_2" not in {m.conv for m in _fused(fast.module)} and len(_fused(fast.module)) == 3
        with torch.inference_mode():
            fast(torch.zeros(2, 3, 55, 47))
        assert sorted(seen) == [1, 2]
    finally:
        handle.remove()
        conv_hook.remove()
    masked = bdpruning.prune_channels(bdpruning.load_model(BD_WEIGHTS, device="cpu"), "conv_3", [0, 1, 2])
    assert masked.conv_3 not in {m.conv for m in _fused(inference_module(masked).module)}
    assert predict_labels(repaired, safe_set[0]).tolist() == _reference_labels(repaired, safe_set[1])


def test_a_model_that_views_its_input_is_fed_nchw():
    class Viewing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4 * 3 * 3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.conv(x))
            return self.fc(x.view(x.shape[0], -1))

    model = Viewing().eval()
    fast = inference_module(model)
    assert not fast.channels_last
    images = torch.randint(0, 256, (5, 3, 5, 5)).float()
    data = (images.to(torch.uint8), torch.zeros(5, dtype=torch.int64))
    assert predict_labels(model, data, batch_size=2).shape == (5,)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resident_and_streamed_batches_hold_the_reader_s_values(safe_set, channels_last, dtype, monkeypatch):
    path, _, _ = safe_set
    data = as_image_data(path)
    expected = list(data.batches(4))
    resident = list(model_batches(data, 4, torch.device("cpu"), dtype=dtype, channels_last=channels_last))
    assert data.resident  # loaded once, kept for the next pass
    monkeypatch.setattr("bdpruning.data.feed.resident_fits", lambda nbytes, device: False)
    streamed = list(model_batches(as_image_data(path), 4, torch.device("cpu"), dtype=dtype,
                                  channels_last=channels_last))
    for batches in (resident, streamed):
        assert len(batches) == len(expected) == 3
        for (images, labels), (want_images, want_labels) in zip(batches, expected):
            assert images.dtype == dtype and images.shape == want_images.shape
            assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            assert torch.equal(images, want_images.to(dtype)) and torch.equal(labels, want_labels)


def test_copies_of_image_data_share_the_resident_set(safe_set):
    data = as_image_data(safe_set[0])
    copy = as_image_data(data)
    list(model_batches(copy, 5, torch.device("cpu")))
    assert data.resident is copy.resident and len(data.resident) == 1


def test_one_process_counts_equal_lightning_s(nets, always_7, safe_set, tmp_path):
    from bdpruning.lightning_modules.evaluation import evaluate_model
    from bdpruning.lightning_modules.goodnet import evaluate_goodnets

    bd, repaired = nets
    path = safe_set[0]
    poisoned = write_h5_set(tmp_path / "poisoned.h5", safe_set[1][:5], np.zeros(5))
    assert count_evaluation(bd, path, poisoned, batch_size=4) == evaluate_model(bd, path, poisoned, batch_size=4)
    assert count_evaluation(bd, path) == evaluate_model(bd, path)
    assert count_goodnets(bd, [repaired, always_7], path, poisoned, batch_size=3) == \
        evaluate_goodnets(bd, [repaired, always_7], path, poisoned, batch_size=3)


def test_one_device_evaluate_does_not_import_lightning_or_matplotlib(safe_set, tmp_path):
    code = ("import sys; from bdpruning.cli import main; "
            f"code = main(['evaluate', '--model', {str(BD_WEIGHTS)!r}, '--clean', {str(safe_set[0])!r}, "
            f"'--out', {str(tmp_path / 'e.json')!r}, '--accelerator', 'cpu']); "
            "heavy = [m for m in ('pytorch_lightning', 'torchmetrics', 'matplotlib', 'tensorflow') if m in sys.modules]; "
            "print(code, heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip().endswith("0 []"), result.stdout + result.stderr


def test_threads_follow_the_environment_and_the_affinity(monkeypatch):
    from bdpruning.runtime.threads import available_cores, configure_threads

    saved = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        monkeypatch.setenv("BDPRUNE_NUM_THREADS", "1")
        assert configure_threads() == 1 == torch.get_num_threads()
        monkeypatch.delenv("BDPRUNE_NUM_THREADS")
        assert configure_threads() == available_cores() == torch.get_num_threads()
        assert configure_threads(processes=2 * available_cores()) == 1
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_channel_sums_do_not_depend_on_batching_or_order(dtype):
    from fractions import Fraction

    from bdpruning.numerics.exactsum import ExactChannelSums

    generator = torch.Generator().manual_seed(0)
    values = torch.randn(37, 3, 4, 5, generator=generator, dtype=dtype) * 10.0 ** torch.randint(
        -30, 30, (37, 3, 4, 5), generator=generator).to(dtype)
    values[0, 0, 0, 0] = 0.0
    whole = ExactChannelSums()
    whole.add(values)
    pieces = ExactChannelSums()
    for chunk in torch.randperm(37, generator=generator).split(5):
        pieces.add(values[chunk])
    assert torch.equal(whole.bins, pieces.bins)
    exact = [sum(Fraction(v) for v in values[:, c].reshape(-1).tolist()) / values[:, c].numel() for c in range(3)]
    assert whole.means(values[:, 0].numel()) == [float(m) for m in exact]
    with pytest.raises(bdpruning.BdpruningError, match="inf or NaN"):
        ExactChannelSums().add(torch.full((1, 2, 1, 1), float("nan")))
