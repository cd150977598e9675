"""Incremental exact sweep steps: update each image's logits by the pruned channel's
contribution instead of re-running the layers after the split.

Pruning channel ``c`` at the split subtracts ``c``'s values there. Through a linear layer
(convolution, dense, eval BatchNorm, average pooling, flatten, sums, scaling) that change
propagates as the layer applied to the change alone, and the first layers after the split see it
in one channel only (a conv on one input channel, a dense layer on one block of columns: a small
fraction of their cost). A nonlinearity the change reaches (ReLU, max pooling) is recomputed
from its updated input. Everything is held in float64, per image, for the whole chunk.

The float64 logits decide an image's label where round-off cannot: where the top-2 margin
exceeds twice the float32 bound of :mod:`bdpruning.numerics.roundoff` (``LAMBDA sqrt(N) u S``,
``N`` the model's accumulation depth), the float32 suffix the split engine runs would give the
same top-1. The other images are re-run through that float32 suffix exactly as before, so the
labels are the split engine's. Suffixes with any other operation, a model whose logits cannot be
read, or TF32 precision keep the plain split engine.
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
from ..graph.split import split_at
from ..models.outputs import logits_model
from ..models.record import model_info
from ..numerics.roundoff import LAMBDA, UNIT_ROUNDOFF, accumulation_depth

__all__ = ["IncrementalSuffix", "incremental_suffix"]

log = logging.getLogger(__name__)

_LINEAR_MODULES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.Flatten, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                   nn.Dropout, nn.Dropout2d, nn.Identity)
_NONLINEAR_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Sigmoid, nn.Tanh)
_NONLINEAR_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.max_pool2d, F.adaptive_max_pool2d,
                        torch.sigmoid, torch.tanh}
_NONLINEAR_METHODS = {"relu", "sigmoid", "tanh"}
#: float64 work per operation, in float32 operations (half the SIMD width, slower kernels)
FLOAT64_COST = 3.0
#: the incremental path is used where it is estimated at most this share of a suffix re-run
WORTH = 0.75
_SUMS = {operator.add, torch.add, operator.sub, torch.sub}
_SCALES = {operator.mul, torch.mul, operator.truediv, torch.div}


@dataclass
class _Block:
    """A change that is non-zero only in ``values``' slice ``start:start + k`` of dimension 1."""

    start: int
    values: torch.Tensor

    @property
    def stop(self) -> int:
        return self.start + self.values.shape[1]

    def dense(self, like: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((len(self.values), *like.shape[1:]), dtype=like.dtype, device=like.device)
        out[:, self.start:self.stop] = self.values
        return out


def _scalar(value) -> bool:
    return isinstance(value, (int, float))


class IncrementalSuffix:
    """The layers after a split, in float64, updated step by step (see the module docstring)."""

    def __init__(self, suffix: fx.GraphModule, depth: int) -> None:
        self.gm = copy.deepcopy(suffix).double().eval()
        for module in self.gm.modules():  # values are kept per node: nothing may overwrite its input
            if getattr(module, "inplace", False):
                module.inplace = False
        for node in self.gm.graph.nodes:
            if node.kwargs.get("inplace"):
                node.kwargs = {**node.kwargs, "inplace": False}
        self.nodes = [n for n in self.gm.graph.nodes if n.op != "output"]
        self.logits = next(n for n in self.gm.graph.nodes if n.op == "output").args[0]
        if not isinstance(self.logits, fx.Node):
            raise BdpruningError("the suffix does not return one tensor of logits")
        self.split = self.nodes[0]
        self.depth = depth
        self.fallbacks = 0  # images re-run in float32 because their margin was within the bound
        self.updates = 0  # images whose logits were updated incrementally
        self._worth: bool | None = None
        for node in self.nodes:
            if not self._known(node):
                raise BdpruningError(f"the incremental sweep does not know {node.op} {node.target}")
        self.recomputed = {node for node in self.nodes if self._nonlinear(node)}
        # the values a step reads: the split's (the next channel), the logits, and a
        # nonlinearity's input and output; the others only pass their change on
        self.kept = {self.split, self.logits, *self.recomputed,
                     *(arg for node in self.recomputed for arg in node.all_input_nodes)}

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

    # --- full evaluation ------------------------------------------------------------------

    def _run(self, node: fx.Node, env: dict):
        args = fx.graph.map_arg(node.args, lambda n: env[n])
        kwargs = fx.graph.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "get_attr":
            value = self.gm
            for part in node.target.split("."):
                value = getattr(value, part)
            return value
        if node.op == "call_module":
            return self._module(node)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)

    @torch.inference_mode()
    def start(self, values: tuple) -> dict:
        """The float64 value of every node for a chunk of prefix outputs (nothing pruned)."""
        env: dict = {}
        inputs = iter(values)
        for node in self.nodes:
            value = next(inputs).double() if node.op == "placeholder" else self._run(node, env)
            if isinstance(value, torch.Tensor) and value._base is not None:
                value = value.clone()  # a view (flatten) must not alias the value it was taken from
            env[node] = value
        return env

    # --- one step --------------------------------------------------------------------------

    def _delta(self, node: fx.Node, changes: dict, env: dict, rows: torch.Tensor):
        """The change of ``node``'s value on ``rows`` (a :class:`_Block`, a tensor, or None)."""
        changed = [a for a in node.all_input_nodes if changes.get(a) is not None]
        if not changed:
            return None
        if node in self.recomputed:
            return self._recompute(node, env, rows)
        if node.op == "call_module":
            return self._linear_module(self._module(node), changes[changed[0]], env[changed[0]])
        if node.target in _SUMS:
            a, b = (changes.get(arg) if isinstance(arg, fx.Node) else None for arg in node.args)
            if b is None:
                return a
            if node.target in (operator.sub, torch.sub):
                b = _Block(b.start, -b.values) if isinstance(b, _Block) else -b
            if a is None:
                return b
            like = env[node]
            if isinstance(a, _Block) and isinstance(b, _Block) and (a.start, a.stop) == (b.start, b.stop):
                return _Block(a.start, a.values + b.values)
            a = a.dense(like) if isinstance(a, _Block) else a
            b = b.dense(like) if isinstance(b, _Block) else b
            return a + b
        change = changes[node.args[0]]
        if node.target in _SCALES:
            op = node.target
            return _Block(change.start, op(change.values, node.args[1])) if isinstance(change, _Block) \
                else op(change, node.args[1])
        return self._flatten(change, env[node.args[0]])  # torch.flatten / .flatten(1)

    @staticmethod
    def _flatten(change, value: torch.Tensor):
        if isinstance(change, _Block):
            inner = math.prod(value.shape[2:])
            return _Block(change.start * inner, change.values.reshape(len(change.values), -1))
        return change.flatten(1)

    def _linear_module(self, module: nn.Module, change, value: torch.Tensor):
        block = isinstance(change, _Block)
        if isinstance(module, nn.Conv2d):
            weight = module.weight[:, change.start:change.stop] if block else module.weight
            return F.conv2d(change.values if block else change, weight, None, module.stride, module.padding,
                            module.dilation)
        if isinstance(module, nn.Linear):
            if block:
                return change.values @ module.weight[:, change.start:change.stop].T
            return change @ module.weight.T
        if isinstance(module, nn.BatchNorm2d):
            scale = torch.rsqrt(module.running_var + module.eps)
            if module.weight is not None:
                scale = scale * module.weight
            if block:
                return _Block(change.start, change.values * scale[change.start:change.stop].view(1, -1, 1, 1))
            return change * scale.view(1, -1, 1, 1)
        if isinstance(module, nn.Flatten):
            return self._flatten(change, value)
        return _Block(change.start, module(change.values)) if block else module(change)  # pooling, identity

    def _recompute(self, node: fx.Node, env: dict, rows: torch.Tensor) -> torch.Tensor:
        args = fx.graph.map_arg(node.args, lambda n: env[n][rows] if self._batched(n, env) else env[n])
        kwargs = fx.graph.map_arg(node.kwargs, lambda n: env[n][rows] if self._batched(n, env) else env[n])
        if node.op == "call_module":
            new = self._module(node)(*args, **kwargs)
        elif node.op == "call_function":
            new = node.target(*args, **kwargs)
        else:
            new = getattr(args[0], node.target)(*args[1:], **kwargs)
        change = new - env[node][rows]
        if isinstance(rows, slice):  # set, not added: a recomputed value carries no accumulated round-off
            env[node] = new
        else:
            env[node][rows] = new
        return change

    def _batched(self, node: fx.Node, env: dict) -> bool:
        return node.op not in ("get_attr",) and isinstance(env[node], torch.Tensor) and env[node].dim() > 0 \
            and len(env[node]) == len(env[self.split])

    @torch.inference_mode()
    def step(self, env: dict, active: torch.Tensor, channel: int) -> torch.Tensor:
        """Prune ``channel`` at the split for the images ``active`` of the chunk (those where
        it is non-zero): update the values in ``env`` and return their float64 logits."""
        n = len(env[self.split])
        # on the other images the change is exactly zero: when most images change, updating
        # them all (views, no gathering) is cheaper than indexing the rows that do
        rows = slice(None) if 2 * len(active) > n else active
        changes: dict = {self.split: _Block(channel, -env[self.split][rows, channel:channel + 1])}
        for node in self.nodes:
            if node is not self.split:
                changes[node] = self._delta(node, changes, env, rows)
            change = changes[node]
            if change is None:
                continue
            if node not in self.kept or node in self.recomputed:  # unread, or already set
                pass
            elif isinstance(change, _Block):
                env[node][rows, change.start:change.stop] += change.values
            else:
                env[node][rows] += change
            if node is self.logits:
                break
        self.updates += len(active)
        return env[self.logits][active]

    def cost_ratio(self, env: dict) -> float:
        """The estimated cost of one incremental step over one re-run of the float32 suffix, per
        image, from the chunk's shapes: multiply-adds of the convolutions and dense layers (on
        the changed block only while the change is one block), float64 counted as
        :data:`FLOAT64_COST` float32 operations, and each value a step rewrites."""
        n = len(env[self.split])
        widths: dict = {self.split: 1}  # a block's width along dimension 1, "dense", or None
        suffix = step = 0.0
        for node in self.nodes[1:]:
            inputs = [widths.get(a) for a in node.all_input_nodes if widths.get(a) is not None]
            width = None if not inputs else (inputs[0] if len(inputs) == 1 else "dense")
            value = env[node]
            per_image = value.numel() / n if isinstance(value, torch.Tensor) else 0.0
            module = self._module(node) if node.op == "call_module" else None
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in, columns = module.weight[0].numel(), module.weight.shape[1]
                suffix += per_image * fan_in
                if width is not None:
                    step += per_image * fan_in * (1 if width == "dense" else width / columns)
                    width = "dense"
            elif node in self.recomputed and width is not None:
                width = "dense"
            elif isinstance(width, int) and (isinstance(module, nn.Flatten) or node.target in (torch.flatten, "flatten")):
                width *= math.prod(env[node.all_input_nodes[0]].shape[2:])
            if width == "dense":
                step += 3 * per_image  # the change, the update, the recomputation's read
            widths[node] = width
            if node is self.logits:
                break
        return FLOAT64_COST * step / max(suffix, 1.0)

    def worth(self, values: tuple) -> bool:
        """Whether the incremental path is estimated cheaper than re-running the float32 suffix
        (at most :data:`WORTH` of its cost; judged once, on one image of ``values``)."""
        if self._worth is None:
            one = tuple(v[:1] if isinstance(v, torch.Tensor) and v.dim() and len(v) == len(values[0]) else v
                        for v in values)
            self._worth = self.cost_ratio(self.start(one)) <= WORTH
        return self._worth

    def unsure(self, logits: torch.Tensor) -> torch.Tensor:
        """Images whose float32 top-1 may differ from the float64 one: top-2 margin within twice
        the round-off bound (plus the float64 updates' own, far smaller, error)."""
        if logits.shape[1] < 2:
            return torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
        top2 = logits.topk(2, dim=1).values
        scale = logits.abs().amax(dim=1).clamp_min(1.0)
        bound = LAMBDA * math.sqrt(self.depth) * UNIT_ROUNDOFF * scale
        return top2[:, 0] - top2[:, 1] <= 2.0 * bound * (1 + 1e-6)


def _fp32_exact() -> bool:
    return torch.get_float32_matmul_precision() == "highest" and not (
        torch.cuda.is_available() and (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32))


def incremental_suffix(model: nn.Module, split_node: str) -> IncrementalSuffix | None:
    """The :class:`IncrementalSuffix` after ``split_node`` when it applies (known operations up to
    the logits, logits readable, IEEE float32 in force), else None."""
    if not _fp32_exact():
        return None
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
