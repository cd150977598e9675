"""The model directory: how bdpruning saves a (possibly pruned, possibly compact) model.

A model directory holds ``model.json`` (the record: architecture, classes, input shape and
range, outputs, source, the pruned channels and the channels removed by compaction),
``model.safetensors`` (weights under the model's own parameter names; loading never executes
pickled code) and ``model.onnx`` (the same model, NCHW float input ``input`` with a dynamic batch,
pruned channels zero). An ONNX-loaded model keeps its original graph as ``graph.onnx``.

An adopted model (:func:`bdpruning.adopt`) is saved as its own state dict (BatchNorm kept, its
parameter names), so ``load_model(directory, into=MyNet())`` gives the user's class back; its
``model.onnx`` is what the CLI runs. :func:`bdpruning.models.loading.load_model` reads it all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
from safetensors.torch import save_file
from torch import nn

from ..pruning.masks import baked_copy, masked_channels, plain_state_dict, shift_kept_layers
from ..runtime.atomic import atomic_dir, prepare_out_dir
from .onnx_graph import export_onnx, onnx_to_torch
from .record import model_info

__all__ = ["save_model_dir", "write_model_files", "MODEL_JSON", "WEIGHTS", "ONNX_FILE", "GRAPH_FILE", "FORMAT"]

MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"
ONNX_FILE = "model.onnx"
GRAPH_FILE = "graph.onnx"  # an ONNX-loaded model's own graph, that its weights are loaded into
FORMAT = "bdpruning-model"


def save_model_dir(model: nn.Module, directory: str | os.PathLike[str], extra: dict | None = None, *,
                   force: bool = False) -> Path:
    """Save ``model`` (loaded by bdpruning or adopted) as the model directory ``directory``,
    written atomically: it appears complete or not at all (parents are created). ``extra``
    entries go into ``model.json``. Raises :class:`~bdpruning.BdpruningError` when ``directory``
    exists and is not empty (unless ``force``, which replaces it) or the model has no record."""
    out = Path(directory)
    empty = out.is_dir() and not any(out.iterdir())
    out = prepare_out_dir(out, force or empty)
    model_info(model)  # refuse an unrecorded model before anything is written
    with atomic_dir(out) as tmp:
        write_model_files(model, tmp, extra)
    return out


def write_model_files(model: nn.Module, directory: str | os.PathLike[str], extra: dict | None = None,
                      onnx_bytes: bytes | None = None) -> Path:
    """Write the model's files into the existing ``directory`` (a stage's temporary directory:
    the stage makes the whole output atomic). ``model.onnx`` is exported from ``model`` unless
    ``onnx_bytes`` gives it (the converter keeps tf2onnx's graph, verified against Keras)."""
    directory = Path(directory)
    info = model_info(model)
    masks, shift_kept = masked_channels(model), shift_kept_layers(model)
    meta = {
        "format": FORMAT,
        "version": 1,
        "architecture": info.architecture,
        "num_classes": info.num_classes,
        "input_shape": list(info.input_shape),
        "input_range": info.input_range,
        "source": info.source,
        "outputs": info.outputs,
        "pruned": masks,
        "shift_kept": shift_kept,
        "removed": [{"layer": layer, "channels": channels} for layer, channels in info.removed],
    }
    save_file(plain_state_dict(model), str(directory / WEIGHTS))
    if onnx_bytes is None:
        # an adopted model's own forward may not export with pruning hooks; a loaded one does
        export_onnx(baked_copy(model) if info.architecture == "adopted" else model, directory / ONNX_FILE,
                    info.input_shape)
    else:
        (directory / ONNX_FILE).write_bytes(onnx_bytes)
    if info.architecture == "onnx":
        (directory / GRAPH_FILE).write_bytes(info.onnx_bytes)
    if info.architecture == "adopted":
        meta["class"] = f"{type(model).__module__}.{type(model).__qualname__}"
        graph_names = _graph_layers(directory / ONNX_FILE, masks)
        meta["graph_pruned"] = {graph_names[layer]: channels for layer, channels in masks.items() if layer in graph_names}
        meta["graph_shift_kept"] = [graph_names[layer] for layer in shift_kept if layer in graph_names]
    meta.update(extra or {})
    (directory / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def _graph_layers(onnx_path: Path, masks: dict[str, list[int]]) -> dict[str, str]:
    """``{layer: graph layer}`` for the masked layers of an adopted model: the names its ONNX
    graph's convolutions get in onnx2torch (``layer2.conv2`` is ``layer2/conv2/Conv``, its
    BatchNorm folded in), so a reload without the class keeps the masks. The graph is converted
    now, so a directory the CLI cannot run is refused before it is written."""
    modules = dict(onnx_to_torch(onnx.load(str(onnx_path)), onnx_path).named_modules())
    names = {}
    for layer, channels in masks.items():
        name = "/".join(layer.split(".")) + "/Conv"
        if channels and getattr(modules.get(name), "out_channels", None) is not None:
            names[layer] = name
    return names
