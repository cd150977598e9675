"""Tracing a model with torch.fx, with bdpruning's errors: one home for the graph that the
fast sweep (:mod:`.split`), the fused inference form (:mod:`.fused`), the masks' BatchNorm
look-up and the channel dependencies (:mod:`bdpruning.pruning.dependency`) walk."""

from __future__ import annotations

from torch import fx, nn

from ..errors import BdpruningError

__all__ = ["trace_model", "module_node", "module_nodes"]


def trace_model(model: nn.Module) -> fx.GraphModule:
    """The fx graph of ``model`` (onnx2torch models already are one). Submodules are shared
    with ``model``, not copied."""
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types for untraceable Python control flow
        raise BdpruningError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(exc).__name__}: {exc}); "
            "this needs a traceable model"
        ) from None


def module_nodes(gm: fx.GraphModule, module_name: str) -> list[fx.Node]:
    """The nodes that call ``module_name`` (a module called twice has two)."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == module_name]


def module_node(gm: fx.GraphModule, module_name: str) -> fx.Node:
    """The one node that calls ``module_name``; refuses a layer called several times."""
    nodes = module_nodes(gm, module_name)
    if len(nodes) != 1:
        raise BdpruningError(f"layer {module_name!r} is called {len(nodes)} times in the graph; expected once")
    return nodes[0]
