"""The fast inference form computes what the plain model does: every conv-ReLU fused, hooked and
masked layers left alone, channels-last only where the model allows it; CPU inference runs in
cache-sized batches."""

from __future__ import annotations


import numpy as np
import torch
from torch import nn

import bdpruning
from bdpruning.graph.fused import CPU_BATCH, ConvReLU, in_cpu_batches, inference_module
from bdpruning.evaluation.predict import predict_labels
from bdpruning.numerics.roundoff import float64_reference
from helpers.material import BD_WEIGHTS


def _reference_labels(model: nn.Module, images: np.ndarray) -> list[int]:
    return float64_reference(model, np.asarray(images, np.float32)).logits.argmax(1).tolist()


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




class _PerImageAndShared(nn.Module):
    """Per-image outputs (exact elementwise arithmetic) and one value that is not per image."""

    def forward(self, x: torch.Tensor):
        return 2 * x, x[:, 0, 0, 0], torch.tensor([7.0, 8.0])


def test_cpu_inference_runs_in_cache_sized_batches_and_concatenates_per_image_outputs():
    calls = []
    module = _PerImageAndShared()
    module.register_forward_pre_hook(lambda _, args: calls.append(len(args[0])))
    images = torch.arange(150 * 3 * 2 * 2, dtype=torch.float32).reshape(150, 3, 2, 2)
    with torch.inference_mode():
        doubled, first, shared = in_cpu_batches(module, images)
        alone = in_cpu_batches(lambda x: 2 * x, images)
    assert calls == [CPU_BATCH, CPU_BATCH, 150 - 2 * CPU_BATCH]
    assert torch.equal(doubled, 2 * images) and torch.equal(alone, 2 * images)
    assert torch.equal(first, images[:, 0, 0, 0]) and torch.equal(shared, torch.tensor([7.0, 8.0]))
    calls.clear()
    in_cpu_batches(module, images)  # with autograd on (training), one call as it is
    assert calls == [150]
