"""ChannelMasks' forward hook against its definition: a conv whose weight is scaled by the mask
(plus the noise, perturbed) and whose bias by 1 (1 + the bias noise, perturbed), in values and in
the gradients of the masks, the noises and, where the model trains, its own parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bdpruning.criteria.channel_masks import ChannelMasks


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("perturbed", [False, True], ids=["natural", "perturbed"])
def test_the_hook_equals_a_conv_with_its_weight_and_bias_scaled(perturbed, trainable):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).double().requires_grad_(trainable)
    masks = ChannelMasks(nn.Sequential(conv, nn.ReLU()), noise=True)
    with torch.no_grad():
        for parameter in (*masks.mask_parameters(), *masks.noise_parameters()):
            parameter.copy_(torch.rand_like(parameter) * 2 - 0.5)
    masks.perturbed = perturbed
    images = torch.randn(5, 3, 7, 6, dtype=torch.float64)
    weights = torch.randn(5, 4, 5, 4, dtype=torch.float64)  # a loss that weighs every output

    mask, noise, noise_bias = masks.masks[0], masks.noises[0], masks.noise_biases[0]
    scale = mask + noise if perturbed else mask
    bias_scale = 1 + noise_bias if perturbed else torch.ones_like(noise_bias)
    expected = F.conv2d(images, conv.weight * scale.view(-1, 1, 1, 1), conv.bias * bias_scale)
    hooked = conv(images)
    torch.testing.assert_close(hooked, expected, rtol=1e-12, atol=1e-12)

    inputs = {"mask": mask, **({"noise": noise, "noise_bias": noise_bias} if perturbed else {}),
              **({"weight": conv.weight, "bias": conv.bias} if trainable else {})}
    got = torch.autograd.grad((hooked * weights).sum(), list(inputs.values()))
    want = torch.autograd.grad((expected * weights).sum(), list(inputs.values()))
    for name, g, w in zip(inputs, got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
        assert g.abs().max() > 0
    masks.remove()
    assert torch.equal(conv(images), F.conv2d(images, conv.weight, conv.bias))
