"""Small passes over tf2onnx graphs: find what onnx2torch cannot convert; drop needless
transposes.

Keras flattens NHWC tensors, so tf2onnx keeps a ``Transpose`` to NHWC (and a ``Shape`` ->
``Reshape`` chain) before every ``Flatten -> Dense``, and a transpose pair where such a tensor
also feeds a convolution. :func:`simplify` folds the flatten order into the Dense kernel (as
:func:`bdpruning.models.keras_h5.deepid_state_dict` does for DeepID), so the graph flattens NCHW
directly, then cancels inverse transpose pairs and drops the nodes left unused.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx2torch.node_converters import get_converter

from ..models.keras_h5 import nhwc_rows_to_nchw

__all__ = ["unconvertible_nodes", "simplify"]

_TO_NHWC = [0, 2, 3, 1]


def unconvertible_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes onnx2torch has no converter for (including TensorFlow ops tf2onnx left unmapped)."""
    opsets = {entry.domain or "": entry.version for entry in proto.opset_import}
    bad = []
    for node in proto.graph.node:
        domain = node.domain or ""
        try:
            get_converter(node.op_type, opsets.get(domain, 1), domain)
        except NotImplementedError:
            bad.append(node)
    return bad


def _perm(node: onnx.NodeProto) -> list[int] | None:
    if node.op_type != "Transpose":
        return None
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _uses(graph: onnx.GraphProto) -> Counter:
    uses = Counter(name for node in graph.node for name in node.input)
    uses.update(output.name for output in graph.output)
    return uses


def _static_shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    return {
        info.name: [d.dim_value for d in info.type.tensor_type.shape.dim]
        for info in inferred.graph.value_info
    }


def _fold_flatten_transposes(proto: onnx.ModelProto) -> None:
    """``MatMul(Reshape(Transpose(x, NHWC)), W)`` -> ``MatMul(Flatten(x), W')``, rows of W permuted."""
    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {init.name: init for init in graph.initializer}
    shapes = _static_shapes(proto)
    uses = _uses(graph)
    for matmul in [node for node in graph.node if node.op_type == "MatMul"]:
        reshape = producers.get(matmul.input[0])
        if reshape is None or reshape.op_type != "Reshape" or uses[reshape.output[0]] != 1:
            continue
        transpose = producers.get(reshape.input[0])
        weight = initializers.get(matmul.input[1])
        nhwc = shapes.get(reshape.input[0], [])
        if transpose is None or _perm(transpose) != _TO_NHWC or weight is None or uses[weight.name] != 1:
            continue
        if len(nhwc) != 4 or not all(nhwc[1:]) or weight.dims[0] != np.prod(nhwc[1:]):
            continue
        h, w, c = nhwc[1:]
        kernel = numpy_helper.to_array(weight)
        kernel = nhwc_rows_to_nchw(kernel, h, w, c)
        weight.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(kernel), weight.name))
        flatten = helper.make_node("Flatten", [transpose.input[0]], [reshape.output[0]], name=reshape.name, axis=1)
        reshape.CopyFrom(flatten)


def _cancel_inverse_transposes(graph: onnx.GraphProto) -> None:
    """Consumers of ``Transpose(Transpose(x, p), q)`` with ``p`` then ``q`` the identity read ``x``."""
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        first = producers.get(node.input[0]) if node.input else None
        outer, inner = _perm(node), _perm(first) if first is not None else None
        if outer is None or inner is None or [inner[i] for i in outer] != list(range(len(outer))):
            continue
        source, bypassed = first.input[0], node.output[0]
        if any(output.name == bypassed for output in graph.output):
            continue
        for consumer in graph.node:
            consumer.input[:] = [source if name == bypassed else name for name in consumer.input]


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nobody reads, then initializers no node reads."""
    while True:
        uses = _uses(graph)
        dead = [node for node in graph.node if not any(uses[out] for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    uses = _uses(graph)
    for init in [init for init in graph.initializer if not uses[init.name]]:
        graph.initializer.remove(init)
    names = {out for node in graph.node for out in node.output}
    for info in [info for info in graph.value_info if info.name not in names]:
        graph.value_info.remove(info)


def simplify(proto: onnx.ModelProto) -> None:
    """Remove the NHWC transposes of flatten layers and cancel inverse pairs (in place)."""
    _fold_flatten_transposes(proto)
    _cancel_inverse_transposes(proto.graph)
    _drop_unused(proto.graph)
