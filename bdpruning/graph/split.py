"""Splitting a network at a layer with torch.fx, so that the part before it runs only once.

``split_at(model, layer)`` returns a *prefix* that maps the input to the layer's output plus
every other value the rest of the network still needs (skip connections), and a *suffix* that
finishes the forward pass from those values. ``suffix(*prefix(x)) == model(x)``, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from ..errors import BdpruningError
from .layers import find_layer
from .ops import maps_zero_to_zero
from .tracing import module_node, trace_model

__all__ = ["SplitModel", "check_fed_by", "per_image", "split_at", "zero_preserving_path"]

@dataclass
class SplitModel:
    """``prefix(x) -> (value at the split, *other values)``; ``suffix(value, *others) -> output``."""

    prefix: fx.GraphModule
    suffix: fx.GraphModule
    node_name: str
    channels_last: bool = False  # whether the prefix wants NHWC input (see bdpruning.graph.fused)


def per_image(value: object, count: int) -> bool:
    """Whether ``value`` (one of a batch's prefix outputs) holds one entry per image of a batch
    of ``count``, rather than a value shared by all of them."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == count


def _reaches(source: fx.Node, target: fx.Node) -> bool:
    """Whether ``target`` is ``source`` or computed from it."""
    seen, todo = {source}, [source]
    while todo:
        node = todo.pop()
        if node is target:
            return True
        fresh = [user for user in node.users if user not in seen]
        seen.update(fresh)
        todo.extend(fresh)
    return False


def check_fed_by(model: nn.Module, layer: str, rank_layer: str) -> None:
    """Refuse a ``rank_layer`` that is not computed from ``layer`` in the traced graph (one
    upstream of it, or on another branch): pruning ``layer`` cannot change it."""
    gm = trace_model(model)
    name, _ = find_layer(model, layer)
    rank_name, _ = find_layer(model, rank_layer)
    node, rank_node = module_node(gm, name), module_node(gm, rank_name)
    if _reaches(node, rank_node):
        return
    where = "upstream of" if _reaches(rank_node, node) else "not fed by"
    raise BdpruningError(
        f"rank layer {rank_name!r} is {where} the pruned layer {name!r}, so pruning cannot change it; "
        f"choose a rank layer fed by {name!r}"
    )


def zero_preserving_path(model: nn.Module, start: str, end: str) -> bool:
    """Whether ``end``'s output channel c is exactly zero whenever ``start``'s is, and
    ``start``'s values reach the rest of the network only through ``end``."""
    gm = trace_model(model)
    start_name, _ = find_layer(model, start)
    end_name, _ = find_layer(model, end)
    node, target = module_node(gm, start_name), module_node(gm, end_name)
    while node is not target:
        users = list(node.users)
        if len(users) != 1:
            return False
        node = users[0]
        if not maps_zero_to_zero(gm, node):
            return False
    return True


def split_at(model: nn.Module, layer: str) -> SplitModel:
    """Split ``model`` after ``layer`` (a module name or Keras name)."""
    gm = trace_model(model)
    name, _ = find_layer(model, layer)
    split = module_node(gm, name)
    downstream: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op != "output" and any(a is split or a in downstream for a in node.all_input_nodes):
            downstream.add(node)
    boundary: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node in downstream or node.op == "output":
            for arg in node.all_input_nodes:
                if arg is not split and arg not in downstream and arg.op != "get_attr" and arg not in boundary:
                    boundary.append(arg)

    prefix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node in downstream or node.op == "output":
            continue
        env[node] = prefix_graph.node_copy(node, lambda n: env[n])
    prefix_graph.output((env[split], *[env[n] for n in boundary]))
    prefix = fx.GraphModule(gm, prefix_graph)
    prefix.graph.eliminate_dead_code()
    prefix.recompile()

    suffix_graph = fx.Graph()
    env = {split: suffix_graph.placeholder("split_value")}
    for i, node in enumerate(boundary):
        env[node] = suffix_graph.placeholder(f"boundary_{i}")
    for node in gm.graph.nodes:
        if node in downstream or node.op == "output" or (node.op == "get_attr" and node not in env):
            if node.op == "get_attr" and not any(u in downstream or u.op == "output" for u in node.users):
                continue
            env[node] = suffix_graph.node_copy(node, lambda n: env[n])
    return SplitModel(prefix, fx.GraphModule(gm, suffix_graph), name)

