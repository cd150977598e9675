"""What a model outputs: probabilities from a final softmax, or logits, and the logits behind it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..graph.tracing import trace_model

__all__ = ["logits_model"]

_SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax}


def _is_softmax(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _SOFTMAX_FUNCTIONS
    if node.op == "call_method":
        return node.target == "softmax"
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, nn.Softmax) or (
            type(module).__name__.startswith("OnnxSoftmax") and not getattr(module, "is_log", False))
    return False


def logits_model(model: nn.Module) -> nn.Module | None:
    """A module computing the logits under ``model``'s final softmax, sharing its weights;
    None when the output is not a softmax (the model returns logits, or something else)."""
    gm = trace_model(model)
    output = next(node for node in gm.graph.nodes if node.op == "output")
    (result,) = output.args
    if not isinstance(result, fx.Node) or not _is_softmax(gm, result):
        return None
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node is result:
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[result.all_input_nodes[0]])
    logits = fx.GraphModule(gm, graph)
    logits.graph.eliminate_dead_code()
    logits.recompile()
    return logits
