"""Finding layers by name: exact module names, or Keras names inside converted graphs."""

from __future__ import annotations

import re

from torch import nn

from .errors import BdpruningError

__all__ = ["find_layer", "layer_names"]


def layer_names(model: nn.Module) -> list[str]:
    """Names of the model's leaf layers, in definition order."""
    return [name for name, module in model.named_modules() if name and not list(module.children())]


def _matches(module_name: str, wanted: str) -> bool:
    # onnx2torch names modules after ONNX nodes, e.g. "model_1/conv_3/Conv2D" or
    # "StatefulPartitionedCall/model/conv_3/BiasAdd": the Keras name is one path component.
    return wanted in re.split(r"[/.:]", module_name)


def find_layer(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """Return ``(module_name, module)`` for a layer given by module name or Keras name.

    Raises :class:`BdpruningError` listing the valid names when ``name`` is unknown or ambiguous.
    """
    modules = dict(model.named_modules())
    if name and name in modules:
        return name, modules[name]
    candidates = [n for n in layer_names(model) if _matches(n, name)]
    if len(candidates) == 1:
        return candidates[0], modules[candidates[0]]
    if len(candidates) > 1:
        # Prefer the layer that owns weights (the Conv of "conv_3", not its ReLU) or the first.
        weighted = [n for n in candidates if getattr(modules[n], "weight", None) is not None]
        chosen = weighted[0] if len(weighted) == 1 else candidates[0]
        return chosen, modules[chosen]
    raise BdpruningError(
        f"unknown layer {name!r}; valid layer names: {', '.join(layer_names(model))}"
    )
