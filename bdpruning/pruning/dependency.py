"""Channel dependencies: which layers shrink together when output channels of one layer go.

As in Torch-Pruning, removing output channels of a layer is planned as a *group*: the layer
itself, the per-channel layers its channels flow through (BatchNorm, depthwise convolutions),
and the layers that consume them (convolution input channels, linear columns), found in the
traced graph rather than known by name::

    group = channel_group(model, "conv_3", torch.zeros(1, 3, 55, 47))
    print(group)            # conv_3 (out) -> conv_4 (in 60 -> 57), fc_1 (in 1200 -> 1140)
    group.remove([0, 1, 2]) # a smaller model, same outputs as with those channels masked

How the members are found: the graph is traced with torch.fx and run once on the example.
Every element downstream of the layer carries the *label* of the source channel it comes from
(-1: not from it). Labels go through the ops that keep channels apart (activations, pooling,
BatchNorm, depthwise convolutions) unchanged per channel, and through the ops that only move
elements (flatten, reshape, permute, cat) by running those very ops on the labels. So the
``fc_1`` columns of a ``conv_3`` channel are found in whatever order the model flattens. The
walk stops at layers that mix channels, whose inputs shrink. Anything else downstream (an add
with another branch, the model's output) would make removal inexact and is refused, naming it.

Exactness: a removed channel is assumed pruned (exactly zero out of its layer). What reaches a
consumer from it is then a fixed tensor, computed by running the same ops on zeros: zero after
ReLU and pooling, a constant after a BatchNorm. A non-zero contribution is folded into the
consumer's bias when it is the same at every output position, and refused otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.nn.utils import prune

from ..errors import BdpruningError
from ..graph.layers import find_layer
from ..graph.ops import NORM_MODULES, op_kind
from ..graph.tracing import module_node, trace_model

__all__ = ["Member", "ChannelGroup", "channel_group", "remove_channels"]

# The ops are classified once, in bdpruning.graph.ops. Labels pass through elementwise ops
# unchanged, are broadcast per channel through pooling and BatchNorm, and are moved by running
# shape ops on them. These shape methods may give a (batch, features) output a fixed size:
_RESHAPE_METHODS = {"view", "reshape"}

_ROLES = ("source", "per-channel", "conv input", "linear input", "matmul input")


@dataclass
class Member:
    """One layer of a group. ``labels[i]`` is the source channel that the layer's i-th output
    channel (source, per-channel layers) or input channel/column (consumers) comes from, -1
    where none does."""

    name: str  # module name (a function's node name for a torch.matmul)
    role: str  # one of _ROLES
    labels: torch.Tensor
    node: fx.Node = field(repr=False)
    # consumers only: the labels of every input element, and the input when all source channels are removed
    input_labels: torch.Tensor | None = field(default=None, repr=False)
    removed_input: torch.Tensor | None = field(default=None, repr=False)
    matrix: str | None = None  # matrix products: the attribute holding the constant matrix

    def kept(self, channels: torch.Tensor) -> torch.Tensor:
        """Indices (along the shrinking dimension) that survive removing ``channels``."""
        return (~torch.isin(self.labels, channels)).nonzero().flatten()


class ChannelGroup:
    """The layers that shrink when output channels of ``layer`` are removed."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, layer: str, members: list[Member],
                 reshapes: list[tuple[fx.Node, torch.Tensor]]) -> None:
        self.model, self.gm, self.layer, self.members = model, gm, layer, members
        self._reshapes = reshapes  # reshapes to a fixed size, with the labels of their output
        self.channels = len(members[0].labels)

    def __repr__(self) -> str:
        parts = [f"{m.name} ({m.role}, {len(m.labels)})" for m in self.members]
        return f"ChannelGroup({self.layer}: " + ", ".join(parts) + ")"

    def describe(self) -> list[dict[str, Any]]:
        """The members as JSON-ready rows: name, role, size of the shrinking dimension."""
        return [{"layer": m.name, "role": m.role, "size": len(m.labels)} for m in self.members]

    def remove(self, channels: Iterable[int], fold: bool = True) -> None:
        """Physically remove ``channels`` of the source layer from every member, in place.

        The channels must be pruned (zero kernel and bias). With ``fold``, what they still
        contribute downstream (a BatchNorm's constant, say) goes into the consumers' biases;
        ``fold=False`` only reshapes (for rebuilding a saved compact model before loading its
        weights). Everything is checked before the model is changed.
        """
        removed = torch.tensor(sorted({int(c) for c in channels}), dtype=torch.long)
        bad = [c for c in removed.tolist() if not 0 <= c < self.channels]
        if bad:
            raise BdpruningError(f"layer {self.layer!r} has {self.channels} channels; cannot remove {bad}")
        if len(removed) == self.channels:
            raise BdpruningError(f"cannot remove all {self.channels} channels of {self.layer!r}")
        if not len(removed):
            return
        if self._reshapes and not self._graph_is_model():
            node = self._reshapes[0][0]
            raise BdpruningError(
                f"{type(self.model).__name__}.forward reshapes {self.layer!r}'s channels to a fixed size "
                f"(node {node.name!r}); write it as x.flatten(1) or x.view(x.size(0), -1)"
            )
        if fold:
            self._check_pruned(removed)
        folds = [(m, self._contribution(m, removed)) for m in self.members if fold and m.removed_input is not None]
        for member in self.members:  # masks become plain weights: the channels are removed for good
            if member.role != "matmul input":
                _unmask(self._module(member))
        with torch.no_grad():
            for member, contribution in folds:
                if contribution is not None:
                    self._fold(member, contribution)
            for member in self.members:
                self._shrink(member, member.kept(removed))
            for node, labels in self._reshapes:
                self._resize(node, int((~torch.isin(labels[0], removed)).sum()))
        if self._reshapes:
            self.gm.recompile()

    # -- planning -------------------------------------------------------------------------------

    def _graph_is_model(self) -> bool:
        return self.gm is self.model

    def _check_pruned(self, removed: torch.Tensor) -> None:
        source = self._module(self.members[0])
        live = source.weight.detach()[removed].flatten(1).ne(0).any(dim=1)
        if source.bias is not None:
            live |= source.bias.detach()[removed].ne(0)
        if live.any():
            raise BdpruningError(f"channels {removed[live].tolist()} of {self.layer!r} are not pruned "
                                 "(non-zero kernel or bias): removing them would change the model")

    def _contribution(self, member: Member, removed: torch.Tensor) -> torch.Tensor | None:
        """What the removed channels add to the consumer's output at one position (None: nothing)."""
        inputs = member.removed_input * torch.isin(member.input_labels, removed)
        if not inputs.any():
            return None
        module = self._module(member)
        if member.role == "conv input":
            response = module._conv_forward(inputs, module.weight, None)
            per_channel = response.flatten(2)
            if not torch.allclose(per_channel, per_channel[..., :1].expand_as(per_channel), rtol=1e-6, atol=1e-7):
                raise BdpruningError(
                    f"the removed channels of {self.layer!r} are not zero at {member.name!r} (input {member.node.args[0]}), "
                    "and its padding makes their contribution vary over positions: not removable exactly"
                )
            return per_channel[0, :, 0]
        if member.role == "linear input":
            return inputs.reshape(-1, inputs.shape[-1])[0] @ module.weight.T
        raise BdpruningError(
            f"the removed channels of {self.layer!r} are not zero at the matrix product {member.node.name!r}, "
            "which has no bias to absorb them: not removable exactly"
        )

    def _module(self, member: Member) -> nn.Module:
        return self.model.get_submodule(member.name)

    # -- changing the model --------------------------------------------------------------------

    def _fold(self, member: Member, contribution: torch.Tensor) -> None:
        module = self._module(member)
        if module.bias is None:
            module.bias = nn.Parameter(contribution.detach().clone())
        else:
            module.bias.add_(contribution)

    def _shrink(self, member: Member, keep: torch.Tensor) -> None:
        if member.role == "matmul input":
            _set_tensor(self.model, member.matrix, _get_tensor(self.model, member.matrix)[keep])
            return
        module = self._module(member)
        if member.role == "source" or member.role == "per-channel":
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(module, name, None) is not None:
                    _set_tensor(module, name, getattr(module, name)[keep])
        else:
            _set_tensor(module, "weight", module.weight[:, keep])
        count = len(keep)
        if isinstance(module, nn.Linear):
            attribute = "out_features" if member.role == "source" else "in_features"
            setattr(module, attribute, count)
        elif isinstance(module, NORM_MODULES):
            module.num_features = count
        elif member.role == "per-channel":  # depthwise convolution
            module.in_channels = module.out_channels = module.groups = count
        else:
            setattr(module, "out_channels" if member.role == "source" else "in_channels", count)

    def _resize(self, node: fx.Node, size: int) -> None:
        """Give a reshape to a fixed (batch, features) size its new feature count."""
        if node.op == "call_module":  # onnx2torch: the shape is a constant input
            target = node.args[1].target
            shape = _get_tensor(self.model, target).clone()
            shape[-1] = size
            _set_tensor(self.model, target, shape)
            return
        args = list(node.args)
        if isinstance(args[1], (tuple, list)):
            args[1] = (*args[1][:-1], size)
        else:
            args[-1] = size
        node.args = tuple(args)


def _unmask(module: nn.Module) -> None:
    for hook in list(module._forward_pre_hooks.values()):
        if isinstance(hook, prune.BasePruningMethod):
            prune.remove(module, hook._tensor_name)


def _get_tensor(owner: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attribute = name.rpartition(".")
    return getattr(owner.get_submodule(module_name) if module_name else owner, attribute)


def _set_tensor(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer, keeping its kind."""
    module_name, _, attribute = name.rpartition(".")
    module = owner.get_submodule(module_name) if module_name else owner
    old = getattr(module, attribute)
    value = value.detach().clone().contiguous()
    if isinstance(old, nn.Parameter):
        setattr(module, attribute, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(module, attribute, value)


# -- building a group ------------------------------------------------------------------------------


def _record(gm: fx.GraphModule, example: torch.Tensor) -> dict[fx.Node, Any]:
    """Every node's value on ``example``."""
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            values[node] = result = super().run_node(node)
            return result

    with torch.no_grad():
        Recorder(gm).run(example)
    return values


def _run(gm: fx.GraphModule, node: fx.Node, value_of: Callable[[fx.Node], Any]) -> Any:
    """Run ``node``'s op with its inputs given by ``value_of``."""
    args = map_aggregate(node.args, lambda a: value_of(a) if isinstance(a, fx.Node) else a)
    kwargs = map_aggregate(node.kwargs, lambda a: value_of(a) if isinstance(a, fx.Node) else a)
    with torch.no_grad():
        if node.op == "call_module":
            return gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)


def _kind(gm: fx.GraphModule, node: fx.Node, tracked: dict[fx.Node, torch.Tensor]) -> str:
    """How ``node`` treats the source's channels: a kind of :mod:`bdpruning.graph.ops`, or the
    role of a layer whose inputs shrink."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            if module.groups == 1:
                return "conv input"
            if module.groups == module.in_channels == module.out_channels:
                return "per-channel"
            return "unsupported"
        if isinstance(module, nn.Linear):
            return "linear input"
    kind = op_kind(gm, node)
    if kind == "scalar":
        others = [a for a in node.args if a not in tracked]
        return "elementwise" if len(others) == 1 and isinstance(others[0], (int, float)) else "unsupported"
    return {"norm": "per-channel", "matmul": "matmul input", None: "unsupported"}.get(kind, kind)


def _per_channel(labels: torch.Tensor, node: fx.Node) -> torch.Tensor:
    """Labels of each channel (dim 1) of a (N, C, *spatial) tensor; refuses mixed channels."""
    if labels.dim() < 2:
        raise BdpruningError(f"node {node.name!r} expects (N, C, ...) input; got shape {tuple(labels.shape)}")
    per_channel = labels[0].flatten(1)[:, 0] if labels.dim() > 2 else labels[0]
    if labels.dim() > 2 and not torch.equal(labels[0].flatten(1), per_channel[:, None].expand(-1, labels[0][0].numel())):
        raise BdpruningError(f"node {node.name!r} works per channel on a tensor whose channels are mixed")
    return per_channel


def _broadcast(per_channel: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return per_channel.view(1, -1, *([1] * (len(shape) - 2))).expand(shape).clone()


def _features(labels: torch.Tensor, node: fx.Node) -> torch.Tensor:
    """Labels of the last dimension, the same in every row."""
    rows = labels.reshape(-1, labels.shape[-1])
    if not torch.equal(rows, rows[:1].expand_as(rows)):
        raise BdpruningError(f"node {node.name!r} mixes the layer's channels differently in different rows")
    return rows[0]


def _fixed_reshape(node: fx.Node, output: torch.Tensor) -> bool:
    """Whether a reshape gives its (batch, features) output a fixed feature count."""
    if output.dim() != 2 or not (
        (node.op == "call_method" and node.target in _RESHAPE_METHODS)
        or (node.op == "call_function" and node.target is torch.reshape)
        or (node.op == "call_module" and type(node.graph.owning_module.get_submodule(node.target)).__name__ == "OnnxReshape")
    ):
        return False
    if node.op == "call_module":
        return isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr"
    shape = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
    return isinstance(shape[-1], int) and shape[-1] != -1


def channel_group(model: nn.Module, layer: str, example_input: torch.Tensor) -> ChannelGroup:
    """The group of layers that shrink with the output channels of ``layer`` (a conv or linear
    layer, by module or Keras name). ``example_input``: one input batch (values do not matter)."""
    gm = trace_model(model)
    name, module = find_layer(model, layer)
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1:
        channel_dim = 1
    elif isinstance(module, nn.Linear):
        channel_dim = -1
    else:
        raise BdpruningError(f"layer {name!r} is a {type(module).__name__}; channels are removed from "
                             "convolutions (groups=1) and linear layers")
    source = module_node(gm, name)
    if model.training:
        raise BdpruningError("put the model in eval mode before planning channel removal")
    values = _record(gm, example_input[:1])
    out = values[source]
    channels = out.shape[channel_dim]
    shape = [1] * out.dim()
    shape[channel_dim] = channels
    labels: dict[fx.Node, torch.Tensor] = {source: torch.arange(channels).view(shape).expand(out.shape).clone()}
    zeros: dict[fx.Node, torch.Tensor] = {source: torch.zeros_like(out)}
    members = [Member(name, "source", torch.arange(channels), source)]
    reshapes: list[tuple[fx.Node, torch.Tensor]] = []

    def given(table: dict[fx.Node, torch.Tensor], fill: float) -> Callable[[fx.Node], Any]:
        def value_of(node: fx.Node) -> Any:
            if node in table:
                return table[node]
            value = values[node]
            if isinstance(value, torch.Tensor) and value.is_floating_point():  # another branch's data
                return torch.full_like(value, fill, dtype=table[source].dtype)
            return value
        return value_of

    for node in gm.graph.nodes:
        inputs = [a for a in node.all_input_nodes if a in labels]
        if node is source or not inputs:
            continue
        kind = "output" if node.op == "output" else _kind(gm, node, labels)
        if kind == "query":
            continue
        if kind in ("unsupported", "output") or (kind != "shape" and len(inputs) > 1):
            what = "the model's output" if kind == "output" else f"{node.name!r} ({node.op} {_target_name(node)})"
            raise BdpruningError(
                f"channels of {name!r} reach {what}, which bdpruning cannot shrink exactly "
                "(supported: activations, pooling, BatchNorm, depthwise and plain convolutions, linear layers, "
                "flatten/reshape/permute/cat)"
            )
        data = inputs[0]
        if kind.endswith("input"):
            if kind == "conv input":
                per_input = _per_channel(labels[data], node)
            else:
                per_input = _features(labels[data], node)
            matrix = None
            if kind == "matmul input":
                weight = node.args[1]
                if node.args[0] is not data or not isinstance(weight, fx.Node) or weight.op != "get_attr":
                    raise BdpruningError(f"channels of {name!r} reach the product {node.name!r} with a non-constant matrix")
                matrix = weight.target
            member_name = node.target if node.op == "call_module" else node.name
            members.append(Member(member_name, kind, per_input, node, labels[data], zeros[data], matrix))
            continue
        output = values[node]
        if kind == "shape":
            labels[node] = _run(gm, node, given(labels, -1))
            zeros[node] = _run(gm, node, given(zeros, 0.0))
            if _fixed_reshape(node, output):
                reshapes.append((node, labels[node]))
            continue
        zeros[node] = _run(gm, node, given(zeros, 0.0))
        if kind == "elementwise":
            labels[node] = labels[data]
            continue
        per_channel = _per_channel(labels[data], node)
        labels[node] = _broadcast(per_channel, output.shape)
        if kind == "per-channel":
            members.append(Member(node.target, "per-channel", per_channel, node))
    return ChannelGroup(model, gm, name, members, reshapes)


def _target_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def remove_channels(
    model: nn.Module, steps: Sequence[tuple[str, Sequence[int]]], example_input: torch.Tensor, fold: bool = True
) -> list[ChannelGroup]:
    """Remove ``channels`` of each ``(layer, channels)`` step in turn (indices as the layer has
    them at that step), in place; returns the groups. See :meth:`ChannelGroup.remove`."""
    was_training = model.training
    model.eval()
    groups = []
    try:
        for layer, channels in steps:
            group = channel_group(model, layer, example_input)
            group.remove(channels, fold)
            groups.append(group)
    finally:
        model.train(was_training)
    return groups
