"""What a model outputs: probabilities from a final softmax, or logits, and the logits behind it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import BdpruningError
from ..graph.tracing import trace_model
from .record import model_info

__all__ = ["check_output_contract", "logits_model"]

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


def check_output_contract(model: nn.Module, outputs: torch.Tensor) -> None:
    """Refuse to train on ``outputs`` (the model's output on its first batch) when they contradict
    the record's contract: "probabilities" must be non-negative and sum to 1 per image, and
    "logits" that do both are probabilities by mistake (the loss would have the wrong sign).
    Training (fine-pruning, ANP, RNP) calls this on its first batch."""
    contract = model_info(model).outputs
    values = outputs.detach().double()
    if values.dim() != 2:
        raise BdpruningError(f"{type(model).__name__} returns shape {tuple(values.shape)}, expected (batch, classes)")
    sums = values.sum(dim=1)
    is_distribution = bool((values >= 0).all()) and bool(((sums - 1).abs() <= 1e-3).all())
    if contract == "probabilities" and not is_distribution:
        raise BdpruningError(
            f"the model is recorded as returning probabilities, but on the first batch its outputs sum to "
            f"{float(sums.min()):.3g}..{float(sums.max()):.3g} per image (min {float(values.min()):.3g}): "
            "it returns logits; say so (--outputs logits, or adopt(..., outputs='logits'))")
    if contract == "logits" and is_distribution and values.shape[1] > 1:
        raise BdpruningError(
            "the model is recorded as returning logits, but on the first batch its outputs are probabilities "
            "(non-negative, summing to 1): say so (--outputs probabilities, or adopt(..., outputs='probabilities'))")
