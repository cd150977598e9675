"""Incremental exact sweep steps: update each image's values after the split by the pruned
channel's contribution instead of re-running every layer after it.

Pruning channel ``c`` at the split subtracts ``c``'s values there. Through a linear layer
(convolution, dense, eval BatchNorm, average pooling, flatten, sums, scaling) that change
propagates as the layer applied to the change alone, and while it is one channel (a block of
columns after a flatten) the layer's work is a small fraction of its cost: a conv on one input
channel, a dense layer on one block of columns. Those layers are *updated*: their values are held
per image for the whole chunk, and each step adds the change. A layer the change reaches spread
over every channel, or a nonlinearity (ReLU, max pooling), and everything after it are
*recomputed* from the updated values, on the images the step changes. All in float32. The
updated layers are linear in the pruned channel's values, so each channel has a map (built once,
by pushing unit values through them) and one matrix product per step updates every kept value;
layer by layer where the maps would exceed :data:`MAP_BYTES`.

For DeepID split at ``pool_3``: ``fc_1`` and ``conv_4`` are updated from the pruned channel alone,
and conv_4's ReLU, ``fc_2``, the sum, its ReLU and the output layer are recomputed: about a third
of the suffix's multiply-adds.

The logits decide an image's label where round-off cannot. The float32 suffix the split engine
runs lies within ``delta = LAMBDA sqrt(N) u S`` of the exact logits (the bound of
:mod:`bdpruning.numerics.roundoff`, ``N`` the model's accumulation depth). The updated logits are a
float32 computation of the same function along a longer path: after ``k`` steps, each update
has added its own products (the pruned channel's share of each updated layer's fan-in) and one
addition per updated value, so their depth is ``N_k = N + k d`` (``d`` those per step) and they
lie within ``delta_k = LAMBDA sqrt(N_k) u S``. Where the top-2 margin exceeds
``2 (delta + delta_k)``, both give the exact top-1; the other images are re-run through the
float32 suffix exactly as before, so the labels are the split engine's. Suffixes with any other
operation, a model whose logits cannot be read, a model in another precision than float32, or
TF32 precision keep the plain split engine.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import BdpruningError
from ..graph.split import per_image, split_at
from ..models.outputs import logits_model
from ..models.record import model_info
from ..numerics.roundoff import LAMBDA, UNIT_ROUNDOFF, accumulation_depth

__all__ = ["ChunkState", "IncrementalSuffix", "incremental_suffix"]

log = logging.getLogger(__name__)

_LINEAR_MODULES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.Flatten, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                   nn.Dropout, nn.Dropout2d, nn.Identity)
_NONLINEAR_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Sigmoid, nn.Tanh)
_NONLINEAR_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.max_pool2d, F.adaptive_max_pool2d,
                        torch.sigmoid, torch.tanh}
_NONLINEAR_METHODS = {"relu", "sigmoid", "tanh"}
#: the incremental path is used where it is estimated at most this share of a suffix re-run
WORTH = 0.75
_SUMS = {operator.add, torch.add, operator.sub, torch.sub}
_SCALES = {operator.mul, torch.mul, operator.truediv, torch.div}
#: the most memory the per-channel maps of :meth:`IncrementalSuffix.start` may take
MAP_BYTES = 64 << 20
#: how a node's value is had at a step: unchanged by pruning, updated by its change, or
#: recomputed from its inputs
CONSTANT, UPDATED, RECOMPUTED = "constant", "updated", "recomputed"


@dataclass
class _Block:
    """A change that is non-zero only in ``values``' slice ``start:start + k`` of dimension 1."""

    start: int
    values: torch.Tensor

    @property
    def stop(self) -> int:
        return self.start + self.values.shape[1]

    def dense(self, shape: torch.Size) -> torch.Tensor:
        """The change in full, for values of per-image ``shape``."""
        out = self.values.new_zeros((len(self.values), *shape))
        out[:, self.start:self.stop] = self.values
        return out


def _scalar(value) -> bool:
    return isinstance(value, (int, float))


@dataclass
class ChunkState:
    """One chunk's values that the steps read and update, and how many steps have updated them."""

    values: dict
    joined: torch.Tensor | None = None  # the kept updated values side by side, when they are mapped
    steps: int = 0


def _without_inplace(suffix: fx.GraphModule) -> fx.GraphModule:
    """A float32 copy of ``suffix`` whose operations never overwrite their input (values are
    kept per node)."""
    gm = copy.deepcopy(suffix).float().eval()
    for module in gm.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    for node in gm.graph.nodes:
        if node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
    return gm


class IncrementalSuffix:
    """The layers after a split, updated step by step (see the module docstring)."""

    def __init__(self, suffix: fx.GraphModule, depth: int) -> None:
        self.gm = _without_inplace(suffix)
        self.nodes = [n for n in self.gm.graph.nodes if n.op != "output"]
        self.logits = next(n for n in self.gm.graph.nodes if n.op == "output").args[0]
        if not isinstance(self.logits, fx.Node):
            raise BdpruningError("the suffix does not return one tensor of logits")
        self.split = self.nodes[0]
        self.depth = depth
        self.fallbacks = 0  # images re-run in float32 because their margin was within the bound
        self.updates = 0  # images whose logits were had without re-running the suffix
        self._worth: bool | None = None
        self.shapes: dict = {}  # each updated node's per-image shape (set by start)
        self.step_depth = 1.0  # the accumulation depth one step adds (set by start)
        self.map_bytes = MAP_BYTES
        self.maps: torch.Tensor | None = None  # (channels, block, kept width), set by the first start
        self._mapped: bool | None = None
        for node in self.nodes:
            if not self._known(node):
                raise BdpruningError(f"the incremental sweep does not know {node.op} {node.target}")
        self.kinds, self.blocks = self._classify()
        recomputed = [n for n in self.nodes if self.kinds[n] == RECOMPUTED]
        # the values a step reads: the split's (the next channel), the recomputed layers'
        # updated inputs, and the logits when they are updated
        self.kept = {self.split, *(a for n in recomputed for a in n.all_input_nodes if self.kinds[a] == UPDATED)}
        if self.kinds[self.logits] == UPDATED:
            self.kept.add(self.logits)
        self.constants = {a for n in recomputed for a in n.all_input_nodes if self.kinds[a] == CONSTANT}
        self.targets = [n for n in self.nodes if n in self.kept and n is not self.split]  # mapped, in order

    def _module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def _known(self, node: fx.Node) -> bool:
        if node.op in ("placeholder", "get_attr"):
            return True
        if node.op == "call_module":
            module = self._module(node)
            if isinstance(module, nn.Conv2d):
                return module.groups == 1 and module.padding_mode == "zeros"
            if isinstance(module, nn.Flatten):
                return module.start_dim == 1 and module.end_dim == -1
            return isinstance(module, _LINEAR_MODULES + _NONLINEAR_MODULES)
        if node.op == "call_function":
            if node.target in _NONLINEAR_FUNCTIONS:
                return True
            if node.target is torch.flatten:
                return node.args[1:] == (1,) and not node.kwargs
            if node.target in _SUMS:
                return len(node.args) == 2 and not node.kwargs
            if node.target in _SCALES:
                return len(node.args) == 2 and not node.kwargs and _scalar(node.args[1])
            return False
        if node.op == "call_method":
            if node.target in _NONLINEAR_METHODS:
                return True
            return node.target == "flatten" and node.args[1:] == (1,) and not node.kwargs
        return False

    def _nonlinear(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self._module(node), _NONLINEAR_MODULES)
        return node.op in ("call_function", "call_method") and (
            node.target in _NONLINEAR_FUNCTIONS or node.target in _NONLINEAR_METHODS)

    def _classify(self) -> tuple[dict, dict]:
        """Each node's kind, and whether its change is one block of channels (always, by the
        graph alone: a block stays a block through per-channel layers with one changed input)."""
        kinds: dict = {self.split: UPDATED}
        blocks: dict = {self.split: True}
        for node in self.nodes[1:]:
            changed = [a for a in node.all_input_nodes if kinds[a] != CONSTANT]
            module = self._module(node) if node.op == "call_module" else None
            if not changed:
                kinds[node], blocks[node] = CONSTANT, False
            elif any(kinds[a] == RECOMPUTED for a in changed) or self._nonlinear(node):
                kinds[node], blocks[node] = RECOMPUTED, False
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                # from one block: a small share of the layer's work; from a dense change: all of it
                kinds[node] = UPDATED if blocks[changed[0]] else RECOMPUTED
                blocks[node] = False
            else:  # per-channel or elementwise: as cheap updated as recomputed
                kinds[node], blocks[node] = UPDATED, len(changed) == 1 and blocks[changed[0]]
        return kinds, blocks

    # --- values ---------------------------------------------------------------------------

    @staticmethod
    def _call(gm: fx.GraphModule, node: fx.Node, args: tuple, kwargs: dict):
        if node.op == "get_attr":
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            return value
        if node.op == "call_module":
            return gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)

    def _evaluate(self, gm: fx.GraphModule, nodes, values: tuple, dtype: torch.dtype) -> dict:
        """Every node of ``nodes`` (an initial run of the graph) on the prefix outputs ``values``."""
        env: dict = {}
        inputs = iter(values)
        for node in nodes:
            if node.op == "placeholder":
                value = next(inputs)
                value = value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            else:
                args = fx.graph.map_arg(node.args, lambda n: env[n])
                kwargs = fx.graph.map_arg(node.kwargs, lambda n: env[n])
                value = self._call(gm, node, args, kwargs)
            if isinstance(value, torch.Tensor) and value._base is not None:
                value = value.clone()  # a view (flatten) must not alias the value it was taken from
            env[node] = value
        return env

    @torch.inference_mode()
    def start(self, values: tuple) -> ChunkState:
        """The values the steps read for a chunk of prefix outputs (nothing pruned): the kept
        updated ones and the constants the recomputed layers read."""
        env = self._evaluate(self.gm, [n for n in self.nodes if self.kinds[n] != RECOMPUTED], values, torch.float32)
        split = env[self.split]
        if self._mapped is None:
            self.shapes = {node: value.shape[1:] for node, value in env.items() if isinstance(value, torch.Tensor)}
            self.maps = self._channel_maps(split)
            self._mapped = self.maps is not None
            self.step_depth = self._step_depth(split.shape[1]) + (self.maps.shape[1] if self._mapped else 0)
        # a private copy of each (steps write to it); the split's contiguous: a channel's slice
        # is then one block of memory per image
        kept = {self.split: split.clone(memory_format=torch.contiguous_format)}
        joined = None
        if self._mapped:
            joined = torch.cat([split.new_zeros(len(split), 0), *(env[t].reshape(len(split), -1) for t in self.targets)],
                               dim=1)
            offset = 0
            for target in self.targets:
                size = math.prod(self.shapes[target])
                kept[target] = joined[:, offset:offset + size].view(len(split), *self.shapes[target])
                offset += size
        else:
            kept.update({t: env[t].clone(memory_format=torch.contiguous_format) for t in self.targets})
        return ChunkState({**kept, **{node: env[node] for node in self.constants}}, joined)

    def _channel_maps(self, split: torch.Tensor) -> torch.Tensor | None:
        """For each channel at the split, the matrix taking its values in one image (flattened)
        to the changes of every kept updated value (flattened, side by side): the updated
        layers are linear in them, so pushing each unit value through them once gives it. None
        where the maps would take more than ``map_bytes``."""
        channels, block = split.shape[1], math.prod(split.shape[2:])
        width = sum(math.prod(self.shapes[t]) for t in self.targets)
        if channels * block * width * split.element_size() > self.map_bytes:
            log.debug("incremental sweep: maps of %d x %d x %d values exceed %d bytes; layer by layer",
                      channels, block, width, self.map_bytes)
            return None
        units = torch.eye(block, dtype=split.dtype, device=split.device).view(block, 1, *split.shape[2:])
        maps = split.new_zeros(channels, block, width)
        for channel in range(channels):
            changes = self._propagate({self.split: _Block(channel, units)})
            offset = 0
            for target in self.targets:
                shape, change = self.shapes[target], changes[target]
                if change is not None:
                    dense = change.dense(shape) if isinstance(change, _Block) else change
                    maps[channel, :, offset:offset + math.prod(shape)] = dense.reshape(block, -1)
                offset += math.prod(shape)
        return maps

    def _step_depth(self, channels: int) -> float:
        """Products and additions one step adds along the updated layers: one channel's share
        (of ``channels`` at the split) of each updated conv or dense layer's fan-in, one for each
        other updated operation, and one for adding the change to the kept value."""
        depth = 1.0
        for node in self.nodes[1:]:
            if self.kinds[node] == UPDATED:
                module = self._module(node) if node.op == "call_module" else None
                linear = isinstance(module, (nn.Conv2d, nn.Linear))
                depth += module.weight[0].numel() / channels if linear else 1.0
        return depth

    def rounding_depth(self, state: ChunkState) -> float:
        """The accumulation depth of the logits after ``state``'s steps: ``N + k d``."""
        return self.depth + state.steps * self.step_depth

    # --- one step --------------------------------------------------------------------------

    def _change(self, node: fx.Node, changes: dict):
        """The change of an updated ``node``'s value (a :class:`_Block`, a tensor, or None)."""
        changed = [a for a in node.all_input_nodes if changes.get(a) is not None]
        if not changed:
            return None
        if node.op == "call_module":
            return self._linear_module(self._module(node), changes[changed[0]])
        if node.target in _SUMS:
            a, b = (changes.get(arg) if isinstance(arg, fx.Node) else None for arg in node.args)
            if b is None:
                return a
            if node.target in (operator.sub, torch.sub):
                b = _Block(b.start, -b.values) if isinstance(b, _Block) else -b
            if a is None:
                return b
            if isinstance(a, _Block) and isinstance(b, _Block) and (a.start, a.stop) == (b.start, b.stop):
                return _Block(a.start, a.values + b.values)
            shape = self.shapes[node]
            return (a.dense(shape) if isinstance(a, _Block) else a) + (b.dense(shape) if isinstance(b, _Block) else b)
        change = changes[node.args[0]]
        if node.target in _SCALES:
            op = node.target
            return _Block(change.start, op(change.values, node.args[1])) if isinstance(change, _Block) \
                else op(change, node.args[1])
        return self._flatten(change)  # torch.flatten / .flatten(1)

    @staticmethod
    def _flatten(change):
        if isinstance(change, _Block):
            inner = math.prod(change.values.shape[2:])
            return _Block(change.start * inner, change.values.reshape(len(change.values), -1))
        return change.flatten(1)

    def _linear_module(self, module: nn.Module, change):
        block = isinstance(change, _Block)
        if isinstance(module, nn.Conv2d):  # updated from one block only (see _classify)
            return F.conv2d(change.values, module.weight[:, change.start:change.stop], None, module.stride,
                            module.padding, module.dilation)
        if isinstance(module, nn.Linear):
            return change.values @ module.weight[:, change.start:change.stop].T
        if isinstance(module, nn.BatchNorm2d):
            scale = torch.rsqrt(module.running_var + module.eps)
            if module.weight is not None:
                scale = scale * module.weight
            if block:
                return _Block(change.start, change.values * scale[change.start:change.stop].view(1, -1, 1, 1))
            return change * scale.view(1, -1, 1, 1)
        if isinstance(module, nn.Flatten):
            return self._flatten(change)
        return _Block(change.start, module(change.values)) if block else module(change)  # pooling, identity

    def _recompute(self, node: fx.Node, state: dict, values: dict, active: torch.Tensor) -> torch.Tensor:
        """``node``'s value on the ``active`` images, from its inputs' current values."""
        n = len(state[self.split])
        rows = slice(None) if len(active) == n else active  # no gathering where every image changes

        def read(arg: fx.Node):
            if arg in values:
                return values[arg]
            value = state[arg]
            if self.kinds[arg] == UPDATED or per_image(value, n):
                return value[rows]
            return value

        args = fx.graph.map_arg(node.args, read)
        kwargs = fx.graph.map_arg(node.kwargs, read)
        return self._call(self.gm, node, args, kwargs)

    @torch.inference_mode()
    def step(self, chunk: ChunkState, active: torch.Tensor, channel: int) -> torch.Tensor:
        """Prune ``channel`` at the split for the images ``active`` of the chunk (those where
        it is non-zero): update ``chunk`` and return their logits."""
        state = chunk.values
        chunk.steps += 1
        n = len(state[self.split])
        # on the other images the change is exactly zero: when most images change, updating
        # them all (views, no gathering) is cheaper than indexing the rows that do
        rows = slice(None) if 2 * len(active) > n else active
        split = state[self.split]
        if chunk.joined is not None:  # every kept value at once, from the channel's map
            pruned = split[rows, channel]
            pruned = pruned.reshape(len(pruned), -1)
            if isinstance(rows, slice):
                chunk.joined.addmm_(pruned, self.maps[channel], alpha=-1)
            else:
                chunk.joined[rows] -= pruned @ self.maps[channel]
            split[rows, channel] = 0
        else:  # layer by layer
            changes = self._propagate({self.split: _Block(channel, -split[rows, channel:channel + 1])})
            for node, change in changes.items():
                if change is None or node not in self.kept:
                    continue
                if isinstance(change, _Block):
                    state[node][rows, change.start:change.stop] += change.values
                else:
                    state[node][rows] += change
        values: dict = {}  # the recomputed nodes' values on the active images
        for node in self.nodes:
            if self.kinds[node] == RECOMPUTED:
                values[node] = self._recompute(node, state, values, active)
            if node is self.logits:
                break
        self.updates += len(active)
        return values[self.logits] if self.logits in values else state[self.logits][active]

    def _propagate(self, changes: dict) -> dict:
        """``changes`` (the split's) with the change of every updated node after it."""
        for node in self.nodes[1:]:
            if self.kinds[node] == UPDATED:
                changes[node] = self._change(node, changes)
            if node is self.logits:
                break
        return changes

    def cost_ratio(self, values: tuple) -> float:
        """The estimated cost of one step over one re-run of the float32 suffix, per image, on
        the prefix outputs ``values``: multiply-adds of the convolutions and dense layers (an
        updated one's on the pruned channel's share only), and each value a step writes."""
        env = self._evaluate(self.gm, self.nodes, values, torch.float32)
        n = len(env[self.split])
        share = 1.0 / env[self.split].shape[1]  # one channel's, also after a flatten
        suffix = step = 0.0
        for node in self.nodes[1:]:
            value = env[node]
            per_image = value.numel() / n if isinstance(value, torch.Tensor) else 0.0
            module = self._module(node) if node.op == "call_module" else None
            macs = per_image * module.weight[0].numel() if isinstance(module, (nn.Conv2d, nn.Linear)) else 0.0
            suffix += macs
            if self.kinds[node] == RECOMPUTED:
                step += macs + per_image
            elif self.kinds[node] == UPDATED:
                source = next(a for a in node.all_input_nodes if self.kinds[a] != CONSTANT)
                block = share if self.blocks[source] else 1.0
                step += macs * block + 2 * per_image * (share if self.blocks[node] else 1.0)
        return step / max(suffix, 1.0)

    def worth(self, values: tuple) -> bool:
        """Whether the incremental path is estimated cheaper than re-running the float32 suffix
        (at most :data:`WORTH` of its cost; judged once, on one image of ``values``)."""
        if self._worth is None:
            one = tuple(v[:1] if per_image(v, len(values[0])) else v for v in values)
            self._worth = self.cost_ratio(one) <= WORTH
        return self._worth

    def decide(self, logits: torch.Tensor, chunk: ChunkState) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-1 labels of ``logits`` and where the float32 suffix's top-1 may differ: top-2
        margin within twice the round-off bounds of both, ``2 (delta + delta_k)`` (the module
        docstring)."""
        if logits.shape[1] < 2:
            return logits.argmax(dim=1), torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
        top2 = logits.topk(2, dim=1)
        first, second = top2.values.unbind(dim=1)
        scale = torch.maximum(first.abs(), logits.amin(dim=1).abs()).clamp_min(1.0)  # the largest |logit|
        bounds = math.sqrt(self.depth) + math.sqrt(self.rounding_depth(chunk))
        return top2.indices[:, 0], first - second <= 2.0 * LAMBDA * bounds * UNIT_ROUNDOFF * scale * (1 + 1e-6)


def _fp32_exact() -> bool:
    return torch.get_float32_matmul_precision() == "highest" and not (
        torch.cuda.is_available() and (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32))


def incremental_suffix(model: nn.Module, split_node: str) -> IncrementalSuffix | None:
    """The :class:`IncrementalSuffix` after ``split_node`` when it applies (a float32 model, known
    operations up to the logits, logits readable, IEEE float32 in force), else None."""
    if not _fp32_exact() or next(model.parameters()).dtype != torch.float32:
        return None  # its bound is float32's; a float64 sweep re-runs its suffix
    try:
        logits = logits_model(model)
        if logits is None and model_info(model).outputs != "logits":
            return None
        head = IncrementalSuffix(split_at(logits if logits is not None else model, split_node).suffix,
                                 accumulation_depth(model))
    except BdpruningError as error:
        log.info("incremental sweep does not apply after %s (%s): the suffix re-runs", split_node, error)
        return None
    return head
