"""ONNX in and out: any graph today's PyTorch or tf2onnx writes becomes an ``nn.Module``, and a
module is exported as ONNX.

:func:`onnx_to_torch` converts with onnx2torch; where onnx2torch lacks a converter for an
operator's version (torch.onnx.export writes opset 20 by default, and the dynamo exporter
``ReduceMean``-18 with its axes as an input), the graph is first brought down to
:data:`ONNX_OPSET` with ``onnx.version_converter``, and the converted module is checked against
onnxruntime (or ONNX's reference evaluator where onnxruntime is not installed) before it is
used. :func:`onnx_outputs` reads the output contract from the graph: a final ``Softmax`` means
probabilities, anything else logits.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from ..errors import file_error

__all__ = ["ONNX_OPSET", "export_onnx", "onnx_input_shape", "onnx_num_classes", "onnx_outputs", "onnx_to_torch"]

log = logging.getLogger(__name__)

#: The opset bdpruning writes, and the one newer graphs are converted down to for onnx2torch.
ONNX_OPSET = 17

# nodes that pass their input through unchanged in value: the contract is read behind them
_PASS_THROUGH = {"Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}
# final nodes whose output is neither probabilities nor logits of one softmax: refuse
_UNDECIDABLE = {"LogSoftmax", "Sigmoid", "ArgMax", "TopK", "Log", "Exp", "Div", "Abs"}


def _inline_identity_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ``Identity`` nodes of initializers by initializers of their own.

    torch.onnx.export shares equal weights (the zero biases of untrained BatchNorms, say)
    through ``Identity`` nodes; onnx2torch wants a convolution's weights as initializers.
    """
    initializers = {init.name: init for init in proto.graph.initializer}
    if not any(n.op_type == "Identity" and n.input[0] in initializers for n in proto.graph.node):
        return proto
    proto = copy.deepcopy(proto)
    initializers = {init.name: init for init in proto.graph.initializer}
    for node in [n for n in proto.graph.node if n.op_type == "Identity" and n.input[0] in initializers]:
        duplicate = copy.deepcopy(initializers[node.input[0]])
        duplicate.name = node.output[0]
        proto.graph.initializer.append(duplicate)
        proto.graph.node.remove(node)
    return proto


def _small_initializers_as_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Integer initializers (axes, shapes) as ``Constant`` nodes: onnx's version converter only
    turns an input back into an attribute (``ReduceMean``-18's axes, say) when it is one."""
    proto = copy.deepcopy(proto)
    graph = proto.graph
    integer = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
    moved = [init for init in graph.initializer if init.data_type in integer]
    for init in moved:
        graph.initializer.remove(init)
    constants = [helper.make_node("Constant", [], [init.name], value=init) for init in moved]
    nodes = constants + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


def _constant_values(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Values of the graph's initializers and ``Constant`` nodes, by name."""
    values = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _without_reshape_allowzero(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``Reshape(allowzero=1)`` with a constant shape free of zeros as plain ``Reshape`` (the
    same operation; the dynamo exporter writes it, onnx2torch does not implement the flag)."""
    def flagged(node: onnx.NodeProto) -> list[onnx.AttributeProto]:
        return [a for a in node.attribute if a.name == "allowzero" and a.i == 1] if node.op_type == "Reshape" else []

    if not any(flagged(node) for node in proto.graph.node):
        return proto
    proto = copy.deepcopy(proto)
    values = _constant_values(proto)
    for node in proto.graph.node:
        for attribute in flagged(node):
            shape = values.get(node.input[1])
            if shape is not None and not (shape == 0).any():
                attribute.i = 0
    return proto


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _convert(proto: onnx.ModelProto) -> nn.Module:
    from onnx2torch import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(_without_reshape_allowzero(_inline_identity_constants(proto)))


def _downgraded(proto: onnx.ModelProto, source: str | os.PathLike[str], reason: str) -> onnx.ModelProto:
    """``proto`` at :data:`ONNX_OPSET`, by onnx's version converter."""
    from onnx import version_converter

    try:
        return version_converter.convert_version(_small_initializers_as_constants(proto), ONNX_OPSET)
    except Exception as exc:  # the converter raises RuntimeError and others from C++ asserts
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise file_error(source, f"onnx2torch cannot convert this graph ({reason}) and ONNX's version converter "
                                 f"cannot bring opset {_opset(proto)} down to {ONNX_OPSET} ({detail}); export "
                                 f"it with torch.onnx.export(..., dynamo=False, opset_version={ONNX_OPSET})") from None


def _reference_outputs(proto: onnx.ModelProto, inputs: np.ndarray) -> np.ndarray:
    """The graph's output on ``inputs`` by onnxruntime, or by ONNX's reference evaluator."""
    name = proto.graph.input[0].name
    try:
        import onnxruntime
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        return np.asarray(ReferenceEvaluator(proto).run(None, {name: inputs})[0])
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {name: inputs})[0])


def _check_against_graph(original: onnx.ModelProto, module: nn.Module, source: str | os.PathLike[str]) -> None:
    """Refuse a converted module whose outputs differ from the original graph's on random inputs."""
    shape = onnx_input_shape(original, source)
    inputs = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
    expected = _reference_outputs(original, inputs).astype(np.float64)
    with torch.no_grad():
        actual = module.eval()(torch.from_numpy(inputs)).double().numpy()
    scale = max(1.0, float(np.abs(expected).max()))
    difference = float(np.abs(actual - expected).max()) if actual.shape == expected.shape else float("inf")
    if not difference <= 1e-4 * scale:
        raise file_error(source, f"the graph converted down to opset {ONNX_OPSET} does not compute what the "
                                 f"original does (largest difference {difference:.3g}); export it with "
                                 f"torch.onnx.export(..., dynamo=False, opset_version={ONNX_OPSET})")


def onnx_to_torch(proto: onnx.ModelProto, source: str | os.PathLike[str]) -> nn.Module:
    """Convert an ONNX graph with onnx2torch (through opset :data:`ONNX_OPSET` where onnx2torch
    lacks a converter, checked against the original graph); one line naming the operators on failure."""
    try:
        return _convert(proto)
    except NotImplementedError as exc:
        reason = str(exc)
        if _opset(proto) <= ONNX_OPSET:
            raise file_error(source, f"onnx2torch cannot convert this graph: {reason}") from None
    lower = _downgraded(proto, source, reason)
    try:
        module = _convert(lower)
    except NotImplementedError as exc:
        raise file_error(source, f"onnx2torch cannot convert this graph, even at opset {ONNX_OPSET}: {exc}") from None
    _check_against_graph(proto, module, source)
    log.info("%s: opset %d converted down to %d for onnx2torch (checked against the original graph)",
             source, _opset(proto), ONNX_OPSET)
    return module


def onnx_input_shape(proto: onnx.ModelProto, source: str | os.PathLike[str]) -> tuple[int, int, int]:
    """The graph's (C, H, W): its first input must be (batch, C, H, W) with fixed C, H, W."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value for d in dims[1:])
    if len(shape) != 3 or not all(shape):
        raise file_error(source, f"ONNX input must be (batch, C, H, W) with fixed C, H, W; got {shape}")
    return shape


def onnx_num_classes(proto: onnx.ModelProto) -> int:
    """The class count: the last dimension of the graph's output (0 where it is not fixed)."""
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value) if dims else 0


def onnx_outputs(proto: onnx.ModelProto, source: str | os.PathLike[str]) -> str:
    """What the graph returns, read from its last node: ``"probabilities"`` behind a final
    ``Softmax`` (over the class axis), else ``"logits"``. Refuses (one line) a graph with several
    outputs or one ending in an operator that is neither (``LogSoftmax``, ``Sigmoid``, ...)."""
    if len(proto.graph.output) != 1:
        raise file_error(source, f"the graph has {len(proto.graph.output)} outputs; bdpruning takes a "
                                 "classifier with one (batch, classes) output")
    producers = {out: node for node in proto.graph.node for out in node.output}
    node = producers.get(proto.graph.output[0].name)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producers.get(node.input[0])
    if node is None:
        raise file_error(source, "cannot tell what the graph returns (its output is not computed by a node); "
                                 "say it with --outputs logits|probabilities")
    if node.op_type == "Softmax":
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)
        if axis in (-1, 1):
            return "probabilities"
    elif node.op_type not in _UNDECIDABLE:
        return "logits"
    raise file_error(source, f"cannot tell whether the graph returns logits or probabilities: it ends in "
                             f"{node.op_type} ({node.name or 'unnamed'}); say it with --outputs logits|probabilities")


def export_onnx(model: nn.Module, path: str | os.PathLike[str], input_shape: tuple[int, ...]) -> None:
    """Export ``model`` to ONNX opset :data:`ONNX_OPSET` (input ``input``, output ``output``,
    dynamic batch), in float32 (a model held in another precision, float64 say, is exported from
    a float32 copy)."""
    if next(model.parameters()).dtype != torch.float32:
        model = copy.deepcopy(model).float()
    was_training = model.training
    model.eval()
    example = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
            input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    model.train(was_training)
    Path(path).write_bytes(buffer.getvalue())

