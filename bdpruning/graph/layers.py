"""Finding layers by name: exact module names, or Keras names inside converted graphs."""

from __future__ import annotations

import re

from torch import nn

from ..errors import BdpruningError

__all__ = ["find_layer", "layer_names"]


_PASS_THROUGH = (nn.Identity, nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _leaves(model: nn.Module) -> list[str]:
    """Names of every leaf module (what :func:`find_layer` matches), in definition order."""
    return [name for name, module in model.named_modules() if name and not list(module.children())]


def layer_names(model: nn.Module) -> list[str]:
    """Names of the model's leaf layers, in definition order; an empty container or an
    ``nn.Identity`` (a residual block's identity shortcut, say) computes nothing and is left out."""
    return [name for name in _leaves(model) if not isinstance(model.get_submodule(name), _PASS_THROUGH)]


def _matches(module_name: str, wanted: str) -> bool:
    # onnx2torch names modules after ONNX nodes, e.g. "model_1/conv_3/Conv2D" or
    # "StatefulPartitionedCall/model/conv_3/BiasAdd": the Keras name is one path component.
    return wanted in re.split(r"[/.:]", module_name)


def _keras_layer(module_name: str, wanted: str) -> str | None:
    """The node-name prefix that ends at Keras layer ``wanted`` ("model/conv_3"), for "/" names."""
    parts = module_name.split("/")
    return "/".join(parts[: parts.index(wanted) + 1]) if wanted in parts[:-1] else None


def _resolve(modules: dict[str, nn.Module], candidates: list[str], wanted: str) -> str | None:
    """The one layer ``candidates`` mean: the only one, or the weighted node of one Keras layer."""
    if len(candidates) == 1:
        return candidates[0]
    keras_layers = {_keras_layer(n, wanted) for n in candidates}
    if len(keras_layers) == 1 and None not in keras_layers:
        # one Keras layer exported as several nodes (Conv then Relu): the node that owns weights
        weighted = [n for n in candidates if getattr(modules[n], "weight", None) is not None]
        if len(weighted) == 1:
            return weighted[0]
    return None


def find_layer(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """Return ``(module_name, module)`` for a layer given by module name or Keras name.

    An exact module name always wins; a short name (one component of module names, as
    ``"conv_3"`` in ``"model/conv_3/BiasAdd"``) must mean one layer. Raises
    :class:`BdpruningError` listing the valid names when ``name`` is unknown, or the
    candidates when it is ambiguous.
    """
    modules = dict(model.named_modules())
    if name and name in modules:
        return name, modules[name]
    candidates = [n for n in _leaves(model) if _matches(n, name)]
    chosen = _resolve(modules, candidates, name)
    if chosen is not None:
        return chosen, modules[chosen]
    if candidates:
        raise BdpruningError(
            f"ambiguous layer {name!r}: it matches {', '.join(candidates)}; give the full module name"
        )
    raise BdpruningError(
        f"unknown layer {name!r}; valid layer names: {', '.join(layer_names(model))}"
    )
