"""One op taxonomy: how each torch op treats the channels of an (N, C, *spatial) tensor.

The channel dependencies (:mod:`bdpruning.pruning.dependency`), the split engine's zero check
(:func:`bdpruning.graph.split.zero_preserving_path`) and the fused inference form
(:mod:`bdpruning.graph.fused`) all read these tables, so a newly supported op is added once.

- *elementwise*: each output element depends only on the same input element (activations,
  dropout, identity); :func:`maps_zero_to_zero` says whether f(0) = 0;
- *pool*: works per channel over the spatial dimensions; a zero channel pools to zero;
- *norm*: BatchNorm, per channel (an affine map: a zero channel becomes a constant);
- *shape*: only moves elements (flatten, reshape, permute, cat, squeeze);
- *query*: reads a size, not the values;
- *scalar*: arithmetic, elementwise when the other operand is a Python number;
- *matmul*: a product with a matrix (onnx2torch writes Keras Dense layers as MatMul + Add).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["op_kind", "maps_zero_to_zero", "is_relu", "NORM_MODULES"]

ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Identity,
)
ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardtanh, F.hardswish,
    F.sigmoid, torch.sigmoid, F.tanh, torch.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
}
ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}
# The elementwise ops above with f(0) != 0.
_NONZERO_AT_ZERO_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
_NONZERO_AT_ZERO_CALLS = {F.sigmoid, torch.sigmoid, "sigmoid"}
_RELU_CALLS = {F.relu, torch.relu, torch.relu_, "relu", "relu_"}  # and nn.ReLU

POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.LPPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}
NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

SHAPE_MODULES = (nn.Flatten, nn.Unflatten)
SHAPE_MODULE_NAMES = {"OnnxReshape", "OnnxTranspose", "OnnxConcat", "OnnxFlatten", "OnnxSqueezeStaticAxes",
                      "OnnxUnsqueezeStaticAxes"}  # onnx2torch
SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.cat, torch.concat,
                   torch.squeeze, torch.unsqueeze}
SHAPE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze"}
QUERY_METHODS = {"size", "dim"}
SCALAR_FUNCTIONS = {operator.mul, operator.truediv, operator.add, operator.sub, torch.mul, torch.div,
                    torch.add, torch.sub}
MATMUL_MODULE_NAMES = {"OnnxMatMul"}
MATMUL_FUNCTIONS = {torch.matmul, torch.mm}


def _op(gm: fx.GraphModule, node: fx.Node):
    """What ``node`` calls: the module, the function, or the method's name (None otherwise)."""
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    if node.op in ("call_function", "call_method"):
        return node.target
    return None


def op_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """``node``'s kind in the taxonomy above (None: none of them; convolutions and linear layers
    are the callers' business)."""
    op = _op(gm, node)
    if node.op == "call_module":
        name = type(op).__name__
        for kind, table in (("elementwise", ELEMENTWISE_MODULES), ("pool", POOL_MODULES), ("norm", NORM_MODULES),
                            ("shape", SHAPE_MODULES)):
            if isinstance(op, table):
                return kind
        return "shape" if name in SHAPE_MODULE_NAMES else "matmul" if name in MATMUL_MODULE_NAMES else None
    if node.op == "call_method":
        for kind, table in (("elementwise", ELEMENTWISE_METHODS), ("shape", SHAPE_METHODS),
                            ("query", QUERY_METHODS)):
            if op in table:
                return kind
        return None
    if node.op == "call_function":
        if op is getattr:
            return "query"
        for kind, table in (("elementwise", ELEMENTWISE_FUNCTIONS), ("scalar", SCALAR_FUNCTIONS),
                            ("pool", POOL_FUNCTIONS), ("shape", SHAPE_FUNCTIONS), ("matmul", MATMUL_FUNCTIONS)):
            if op in table:
                return kind
    return None


def maps_zero_to_zero(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` keeps channels apart and gives a zero channel back as zero (an
    elementwise op with f(0) = 0, or pooling)."""
    kind = op_kind(gm, node)
    if kind == "pool":
        return True
    op = _op(gm, node)
    if node.op == "call_module":
        return kind == "elementwise" and not isinstance(op, _NONZERO_AT_ZERO_MODULES)
    return kind == "elementwise" and op not in _NONZERO_AT_ZERO_CALLS


def is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is a plain ReLU (module, function or method)."""
    op = _op(gm, node)
    if node.op == "call_module":
        return type(op) is nn.ReLU
    return op in _RELU_CALLS
