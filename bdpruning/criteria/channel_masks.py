"""Learnable per-channel masks over a model's conv layers, for ANP and RNP.

Each covered conv channel ``k`` gets a mask ``m_k`` in [0, 1] (and, for ANP, multiplicative
perturbations ``delta_k``, ``xi_k``). They act on the channel's *scaled module*: the BatchNorm
that follows the conv, or the conv itself when none does (DeepID has none). Scaling a module's
weight by ``a`` and its bias by ``b`` is the same as mapping its output ``y`` to
``a * (y - bias) + b * bias`` (both are linear in the weight), so one forward hook does it, on
any architecture, without touching the weights. That map is an inference-mode batch norm (mean
``bias``, variance 1, eps 0, weight ``a``, shift ``b * bias``), which PyTorch runs in one fused pass
over the activations each way (spelled out, a subtraction, a product and a sum take three)::

    masks = ChannelMasks(model, ["conv_1", "conv_2"])   # hooks installed; masks start at 1
    masks.perturbed = True                              # ANP: weight x (m + delta), bias x (1 + xi)
    masks.remove()                                      # hooks gone, model as before
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import BdpruningError
from ..pruning.masks import following_batchnorm
from .base import ChannelScores, conv_layers, order_by

__all__ = ["ChannelMasks", "MASK_POINTS", "check_mask_choice", "mask_scores"]


class ChannelMasks(nn.Module):
    """Masks (``mask_<i>``) and perturbations (``noise_<i>``, ``noise_bias_<i>``) per covered layer.

    Unperturbed, a channel's weight is scaled by its mask and its bias kept; perturbed (ANP),
    the weight by ``mask + noise`` and the bias by ``1 + noise_bias``.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, noise: bool = False) -> None:
        super().__init__()
        self.layers = conv_layers(model, layers)
        modules = dict(model.named_modules())
        self.scaled = [following_batchnorm(model, name) or name for name in self.layers]
        self.masks = nn.ParameterList()
        self.noises = nn.ParameterList()
        self.noise_biases = nn.ParameterList()
        self.perturbed = False
        self._handles = []
        for index, name in enumerate(self.scaled):
            module = modules[name]
            like = dict(device=module.weight.device, dtype=module.weight.dtype)
            count = module.weight.shape[0]
            self.masks.append(nn.Parameter(torch.ones(count, **like)))
            if noise:
                self.noises.append(nn.Parameter(torch.zeros(count, **like)))
                self.noise_biases.append(nn.Parameter(torch.zeros(count, **like)))
            self._handles.append(module.register_forward_hook(self._hook(index)))

    def _hook(self, index: int) -> "_ScaleHook":
        return _ScaleHook(self, index)

    def scales(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer ``index``'s weight scale and bias scale (None: the bias is kept)."""
        if self.perturbed and len(self.noises):
            return self.masks[index] + self.noises[index], 1 + self.noise_biases[index]
        return self.masks[index], None

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def mask_parameters(self) -> list[nn.Parameter]:
        return list(self.masks)

    def noise_parameters(self) -> list[nn.Parameter]:
        return [*self.noises, *self.noise_biases]

    @torch.no_grad()
    def clip_masks(self) -> None:
        """Keep every mask in [0, 1]."""
        for mask in self.masks:
            mask.clamp_(0, 1)

    @torch.no_grad()
    def reset_noise(self, eps: float, generator: torch.Generator | None) -> None:
        """Random perturbations, uniform in [-eps, eps] (drawn on the CPU, so a seed repeats)."""
        for noise in self.noise_parameters():
            values = torch.rand(noise.shape, generator=generator, dtype=noise.dtype) * 2 * eps - eps
            noise.copy_(values.to(noise.device))

    @torch.no_grad()
    def sign_noise_gradients(self) -> None:
        """Replace every perturbation's gradient by its sign (ANP's ``sign_grad``)."""
        for noise in self.noise_parameters():
            if noise.grad is not None:
                noise.grad.sign_()

    @torch.no_grad()
    def clip_noise(self, eps: float) -> None:
        """Keep every perturbation in [-eps, eps]."""
        for noise in self.noise_parameters():
            noise.clamp_(-eps, eps)

    def values(self) -> dict[str, torch.Tensor]:
        """``{conv layer: mask values (CPU, float64)}``."""
        return {layer: mask.detach().double().cpu() for layer, mask in zip(self.layers, self.masks)}


class _ScaleHook:
    """The forward hook of one scaled module (a class, not a closure, so the model pickles)."""

    def __init__(self, masks: ChannelMasks, index: int) -> None:
        self.masks, self.index = masks, index

    def __call__(self, module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (output.dim() - 2)
        scale, bias_scale = self.masks.scales(self.index)
        bias = getattr(module, "bias", None)
        if bias is None:
            return output * scale.view(shape)
        kept = bias if bias_scale is None else bias * bias_scale
        if bias.requires_grad:  # batch_norm does not differentiate its mean: spell the map out
            return (output - bias.view(shape)) * scale.view(shape) + kept.view(shape)
        return F.batch_norm(output, bias, torch.ones_like(bias), scale, kept, training=False, momentum=0.0, eps=0.0)


#: Mask thresholds whose accuracy and ASR a sweep reports (and the criterion's own).
MASK_POINTS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)


def mask_scores(criterion: str, values: dict[str, torch.Tensor], threshold: float, count: int | None,
                settings: dict, seconds: float, extra: dict | None = None, keep_shift: bool = True) -> ChannelScores:
    """Scores from learned masks: lowest mask first; the choice is every mask below ``threshold``,
    or the ``count`` lowest when ``count`` is given. ``keep_shift``: prune as the masks act
    (the scale zeroed, the shift kept)."""
    order = order_by(values, descending=False)
    below = lambda t: sum(int((mask < t).sum()) for mask in values.values())  # noqa: E731
    if count is not None and not 0 <= count <= len(order):
        raise BdpruningError(f"cannot prune the {count} lowest masks: the layers have {len(order)} channels")
    selected = below(threshold) if count is None else count
    return ChannelScores(
        criterion=criterion, score_name="learned mask (low: pruned)",
        scores={layer: mask.tolist() for layer, mask in values.items()}, order=order, selected=selected,
        parameter="mask threshold", points={t: below(t) for t in sorted({*MASK_POINTS, float(threshold)})},
        settings=settings, seconds=seconds, extra=extra or {}, keep_shift=keep_shift,
    )


def check_mask_choice(threshold: float, count: int | None) -> None:
    """Refuse a mask threshold outside (0, 1] or a negative count."""
    if not 0 < threshold <= 1:
        raise BdpruningError(f"the mask threshold must lie in (0, 1] (got {threshold})")
    if count is not None and count < 0:
        raise BdpruningError(f"the number of channels to prune must be at least 0 (got {count})")
