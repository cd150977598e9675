"""The model directory: how bdpruning saves and reloads a (possibly pruned) model.

A model directory holds ``model.json`` (architecture, classes, input shape, source and the
pruned channels), ``model.safetensors`` (weights; loading never executes pickled code) and
``model.onnx`` (the same model, NCHW float input ``input`` with a dynamic batch, 0..255).
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from pathlib import Path

import onnx
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..pruning.dependency import remove_channels
from ..errors import BdpruningError, file_error
from ..pruning.masks import baked_copy, masked_channels, plain_state_dict, prune_channels
from .deepid import DeepID
from .record import OUTPUTS, ModelInfo, attach_info, model_info

__all__ = ["save_model_dir", "load_model_dir", "onnx_to_torch", "export_onnx"]

MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"
ONNX_FILE = "model.onnx"
FORMAT = "bdpruning-model"
ONNX_OPSET = 17


def _inline_identity_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ``Identity`` nodes of initializers by initializers of their own.

    torch.onnx.export shares equal weights (the zero biases of untrained BatchNorms, say)
    through ``Identity`` nodes; onnx2torch wants a convolution's weights as initializers.
    """
    initializers = {init.name: init for init in proto.graph.initializer}
    identities = [n for n in proto.graph.node if n.op_type == "Identity" and n.input[0] in initializers]
    if not identities:
        return proto
    proto = copy.deepcopy(proto)
    initializers = {init.name: init for init in proto.graph.initializer}
    for node in [n for n in proto.graph.node if n.op_type == "Identity" and n.input[0] in initializers]:
        duplicate = copy.deepcopy(initializers[node.input[0]])
        duplicate.name = node.output[0]
        proto.graph.initializer.append(duplicate)
        proto.graph.node.remove(node)
    return proto


def onnx_to_torch(proto: onnx.ModelProto, source: str | os.PathLike[str]) -> nn.Module:
    """Convert an ONNX graph with onnx2torch, naming the unsupported operators on failure."""
    from onnx2torch import convert

    proto = _inline_identity_constants(proto)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return convert(proto)
    except NotImplementedError as exc:
        raise file_error(source, f"onnx2torch cannot convert this graph: {exc}") from None


def export_onnx(model: nn.Module, path: str | os.PathLike[str], input_shape: tuple[int, ...]) -> None:
    """Export ``model`` to ONNX (input ``input``, output ``output``, dynamic batch), in float32
    (a model held in another precision, float64 say, is exported from a float32 copy)."""
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


def save_model_dir(
    model: nn.Module,
    directory: str | os.PathLike[str],
    extra: dict | None = None,
    onnx_bytes: bytes | None = None,
) -> Path:
    """Write the model's files into an existing ``directory`` (callers make it atomic).

    ``model.onnx`` is exported from ``model`` unless ``onnx_bytes`` gives it (the converter
    keeps tf2onnx's graph, verified against Keras).
    """
    directory = Path(directory)
    info = model_info(model)
    if info.architecture == "adopted":
        return _save_adopted(model, info, directory, extra)
    meta = {
        "format": FORMAT,
        "version": 1,
        "architecture": info.architecture,
        "num_classes": info.num_classes,
        "input_shape": list(info.input_shape),
        "source": info.source,
        "outputs": info.outputs,
        "pruned": masked_channels(model),
        "removed": [{"layer": layer, "channels": channels} for layer, channels in info.removed],
        **(extra or {}),
    }
    save_file(plain_state_dict(model), str(directory / WEIGHTS))
    if onnx_bytes is None:
        export_onnx(model, directory / ONNX_FILE, info.input_shape)
    else:
        (directory / ONNX_FILE).write_bytes(onnx_bytes)
    if info.architecture == "onnx":  # the graph that the weights are loaded into
        (directory / "graph.onnx").write_bytes(info.onnx_bytes)
    (directory / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def _save_adopted(model: nn.Module, info: ModelInfo, directory: Path, extra: dict | None) -> Path:
    """An adopted model is saved as its ONNX graph (pruned channels zeroed in the weights,
    removed channels gone), so that it reloads without its Python class."""
    export_onnx(baked_copy(model), directory / ONNX_FILE, info.input_shape)
    onnx_bytes = (directory / ONNX_FILE).read_bytes()
    graph_module = onnx_to_torch(onnx.load_from_string(onnx_bytes), directory / ONNX_FILE)
    graph_info = ModelInfo("onnx", info.num_classes, info.input_shape, info.source, onnx_bytes,
                           outputs=info.outputs)
    pruned = {"pruned_in_adopted_model": masked_channels(model)}
    return save_model_dir(attach_info(graph_module, graph_info), directory, {**pruned, **(extra or {})}, onnx_bytes)


def load_model_dir(directory: str | os.PathLike[str]) -> nn.Module:
    """Load a model directory written by :func:`save_model_dir` (or by ``bdprune convert``)."""
    directory = Path(directory)
    meta_path = directory / MODEL_JSON
    if not meta_path.exists():
        raise file_error(directory, f"not a bdpruning model directory (no {MODEL_JSON})")
    try:
        meta = json.loads(meta_path.read_text())
        architecture, num_classes = meta["architecture"], int(meta["num_classes"])
        input_shape = tuple(int(s) for s in meta["input_shape"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise file_error(meta_path, f"invalid model description ({exc})") from None
    if meta.get("format") != FORMAT:
        raise file_error(meta_path, f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    onnx_bytes = None
    if architecture == "deepid":
        model: nn.Module = DeepID(num_classes)
    elif architecture == "onnx":
        graph = directory / "graph.onnx"
        onnx_bytes = graph.read_bytes()
        model = onnx_to_torch(onnx.load_from_string(onnx_bytes), graph)
    else:
        raise file_error(meta_path, f"unknown architecture {architecture!r}")
    try:
        removed = [(str(step["layer"]), [int(c) for c in step["channels"]]) for step in meta.get("removed", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise file_error(meta_path, f"invalid 'removed' entry ({exc})") from None
    if removed:  # a compact model: shrink the architecture the same way before loading its weights
        try:
            remove_channels(model.eval(), removed, torch.zeros(1, *input_shape), fold=False)
        except BdpruningError as exc:
            raise file_error(meta_path, f"cannot rebuild the compact model ({exc})") from None
    weights = directory / WEIGHTS
    if not weights.exists():
        raise file_error(directory, f"missing {WEIGHTS}")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise file_error(weights, f"cannot read weights ({exc})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise file_error(weights, f"weights do not fit the {architecture} architecture: {first}") from None
    for layer, channels in meta.get("pruned", {}).items():
        if channels:
            prune_channels(model, layer, channels)
    outputs = meta.get("outputs", "probabilities")
    if outputs not in OUTPUTS:
        raise file_error(meta_path, f"invalid 'outputs' {outputs!r} (expected one of {', '.join(OUTPUTS)})")
    info = ModelInfo(architecture, num_classes, input_shape, str(meta.get("source", directory)), onnx_bytes, removed,
                     outputs)
    return attach_info(model.eval(), info)

