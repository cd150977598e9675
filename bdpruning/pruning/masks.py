"""Structured channel masks on conv layers, with ``torch.nn.utils.prune``'s conventions.

A pruned layer keeps ``weight_orig``/``weight_mask`` (and the same for ``bias``); its forward
uses ``weight_orig * weight_mask``, so pruned channels output exactly zero and stay zero while
the model is trained. :func:`plain_state_dict` gives the masked weights under the usual names
for saving; loading re-applies the masks from the saved channel lists.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import prune

from ..errors import BdpruningError
from ..graph.layers import find_layer
from ..graph.tracing import module_nodes, trace_model

__all__ = ["prune_channels", "zeroed_channels", "masked_channels", "pruned_selection", "pruned_channels",
           "plain_state_dict", "refresh_masked_weights", "channel_count", "baked_copy", "following_batchnorm",
           "shift_kept_layers"]


def channel_count(module: nn.Module) -> int:
    """Output channels of a conv (or linear) layer."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise BdpruningError(f"layer {type(module).__name__} has no weight with output channels")
    return weight.shape[0]


def prune_channels(model: nn.Module, layer: str, channels: Iterable[int], *,
                   batchnorm: bool | None = None, keep_shift: bool = False) -> nn.Module:
    """Zero the output ``channels`` of ``layer`` (kernel and bias) with structured masks.

    Where a BatchNorm directly follows the layer, its shift would keep a pruned channel alive
    downstream; ``batchnorm`` (default: whenever one follows) masks the BatchNorm's scale and
    shift too, so the pruned channels are exactly zero after it. ``keep_shift`` prunes as
    ANP's and RNP's authors do: the shift is kept (the BatchNorm's beta; without a BatchNorm,
    the conv's bias), so each pruned channel emits that constant. Masks accumulate: pruning
    more channels later keeps the earlier ones pruned. Returns ``model``.
    """
    name, module = find_layer(model, layer)
    count = channel_count(module)
    channels = sorted({int(c) for c in channels})
    bad = [c for c in channels if not 0 <= c < count]
    if bad:
        raise BdpruningError(f"layer {name!r} has {count} channels; cannot prune {bad}")
    keep = torch.ones(count, device=module.weight.device)
    keep[channels] = 0
    norm = None if batchnorm is False else following_batchnorm(model, name)  # traced only when used
    if norm is None and batchnorm:
        raise BdpruningError(f"no BatchNorm directly follows {name!r}")
    _mask(module, keep, bias=not keep_shift or norm is not None)
    if norm is not None:
        _mask(model.get_submodule(norm), keep, bias=not keep_shift)
    return model


def _mask(module: nn.Module, keep: torch.Tensor, bias: bool = True) -> None:
    """Multiply ``module``'s weight (along its first axis), and its bias unless not ``bias``, by ``keep``, as masks."""
    weight_mask = keep.view(-1, *([1] * (module.weight.dim() - 1))).expand_as(module.weight)
    with torch.no_grad():  # masks accumulate; the masked tensors start as leaves (copyable)
        prune.custom_from_mask(module, "weight", weight_mask.clone())
        if bias and getattr(module, "bias", None) is not None:
            prune.custom_from_mask(module, "bias", keep.clone())
    if _drop_mask_history not in module._forward_hooks.values():
        module.register_forward_hook(_drop_mask_history)


def shift_kept_layers(model: nn.Module) -> list[str]:
    """The masked conv layers whose pruned channels keep their shift (see :func:`prune_channels`):
    the module at the channel's end (its BatchNorm, else the conv) has a bias and no bias mask."""
    kept = []
    for name, channels in masked_channels(model).items():
        end = model.get_submodule(following_batchnorm(model, name) or name)
        if channels and getattr(end, "bias", None) is not None and not hasattr(end, "bias_mask"):
            kept.append(name)
    return kept


def following_batchnorm(model: nn.Module, layer: str) -> str | None:
    """The BatchNorm module that is the only consumer of ``layer``'s output, if any."""
    try:
        gm = trace_model(model)
    except BdpruningError:  # an untraceable model: no graph to look in
        return None
    name, _ = find_layer(model, layer)
    nodes = module_nodes(gm, name)
    if len(nodes) != 1 or len(nodes[0].users) != 1:
        return None
    (user,) = nodes[0].users
    if user.op == "call_module" and isinstance(gm.get_submodule(user.target), nn.modules.batchnorm._BatchNorm):
        norm = gm.get_submodule(user.target)
        if norm.affine and norm.num_features == channel_count(model.get_submodule(name)):
            return str(user.target)
    return None


def _drop_mask_history(module: nn.Module, _inputs: tuple, _output: object) -> None:
    """After a forward, keep the masked tensors without their autograd history.

    ``torch.nn.utils.prune`` stores ``weight = weight_orig * weight_mask`` as a plain attribute
    in a forward pre-hook; after a forward with gradients on it is a non-leaf tensor, which
    ``copy.deepcopy`` and pickling refuse. The forward's graph keeps its own reference, so
    gradients still reach ``weight_orig``; the attribute becomes the same values as a leaf.
    """
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod):
            value = getattr(module, hook._tensor_name, None)
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                setattr(module, hook._tensor_name, value.detach())


def zeroed_channels(model: nn.Module, layer: str) -> list[int]:
    """Channels of ``layer`` whose kernel and bias are entirely zero (masked or not)."""
    _, module = find_layer(model, layer)
    weight = module.weight.detach().flatten(1)
    zero = (weight == 0).all(dim=1)
    if getattr(module, "bias", None) is not None:
        zero &= module.bias.detach() == 0
    return zero.nonzero().flatten().tolist()


def masked_channels(model: nn.Module) -> dict[str, list[int]]:
    """``{layer: channels}`` of every layer that carries a pruning mask (see :func:`prune_channels`)."""
    masked = {}
    for name, module in model.named_modules():
        mask = getattr(module, "weight_mask", None)
        if isinstance(mask, torch.Tensor) and mask.dim() >= 2:  # a BatchNorm's masks follow its conv
            masked[name] = (mask.flatten(1) == 0).all(dim=1).nonzero().flatten().tolist()
    return masked


def pruned_selection(model: nn.Module, layer: str = "conv_3") -> dict[str, list[int]]:
    """``{layer: channels}`` a repaired model has pruned: its masked layers' channels, or, for a model
    without masks (a B' from a Keras file, say), the all-zero channels of ``layer``.

    Refuses a model with nothing pruned.
    """
    masked = {name: channels for name, channels in masked_channels(model).items() if channels}
    if masked:
        return masked
    name, _ = find_layer(model, layer)
    zeroed = zeroed_channels(model, name)
    if not zeroed:
        raise BdpruningError(f"the model has no pruning masks and no all-zero channels in {name!r}: nothing is pruned")
    return {name: zeroed}


def refresh_masked_weights(model: nn.Module) -> nn.Module:
    """Recompute every masked ``weight = weight_orig * weight_mask`` now, as a leaf tensor.

    ``torch.nn.utils.prune`` recomputes it in a forward pre-hook, so after an optimizer step or
    ``load_state_dict`` it is stale until the next forward. Returns ``model``.
    """
    with torch.no_grad():
        for module in model.modules():
            for hook in list(module._forward_pre_hooks.values()):
                if isinstance(hook, prune.BasePruningMethod):
                    hook(module, ())
    return model


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the state dict with masks applied: ``*_orig`` x ``*_mask`` under the plain names."""
    raw = model.state_dict()
    state = {}
    for key, value in raw.items():
        if key.endswith("_mask"):
            continue
        if key.endswith("_orig"):
            key = key[: -len("_orig")]
            value = value * raw[key + "_mask"]
        state[key] = value.detach().cpu().clone().contiguous()
    return state


def baked_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose masks are made permanent: plain weights with the pruned
    channels zero, no pruning hooks (what an exporter should see)."""
    baked = copy.deepcopy(model)
    for module in baked.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return baked


# Old names, kept for one release: "pruned" said neither how a channel is found nor for how many layers.
pruned_channels = zeroed_channels
pruned_layers = pruned_selection
