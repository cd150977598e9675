"""The one model loader: Keras ``.h5``, ONNX files and bdpruning model directories.

What a model returns is read, never guessed: DeepID ends in softmax; an ONNX or Keras graph
returns probabilities when its last operation is a ``Softmax``, else logits; a model directory
says it in its record. ``outputs=`` (``--outputs``) overrides it where the reading is wrong.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import onnx
import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import BdpruningError, file_error
from ..pruning.dependency import remove_channels
from ..pruning.masks import prune_channels
from ..runtime.devices import resolve_device
from .deepid import DEEPID_INPUT_RANGE, DEEPID_INPUT_SHAPE, DeepID
from .directory import FORMAT, GRAPH_FILE, MODEL_JSON, ONNX_FILE, WEIGHTS
from .keras_h5 import deepid_from_keras, fits_deepid, read_keras_h5
from .onnx_graph import onnx_input_shape, onnx_num_classes, onnx_outputs, onnx_to_torch
from .record import OUTPUTS, ModelInfo, attach_info, check_input_range

__all__ = ["load_model"]

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _read_onnx(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception:  # onnx raises DecodeError and others for non-ONNX bytes
        raise file_error(path, "not an ONNX model") from None


def _load_onnx(path: Path, proto: onnx.ModelProto, outputs: str | None) -> nn.Module:
    outputs = outputs or onnx_outputs(proto, path)
    model = onnx_to_torch(proto, path)
    info = ModelInfo("onnx", onnx_num_classes(proto), onnx_input_shape(proto, path), str(path),
                     proto.SerializeToString(), outputs=outputs)
    return attach_info(model, info)


def _load_keras(path: Path, outputs: str | None) -> nn.Module:
    if zipfile.is_zipfile(path):
        raise file_error(path, "a Keras 3 .keras archive; bdpruning reads Keras .h5 files: save it with "
                               "model.save('model.h5')")
    h5 = read_keras_h5(path)
    if fits_deepid(h5):
        model = deepid_from_keras(path, h5)
        info = ModelInfo("deepid", model.num_classes, DEEPID_INPUT_SHAPE, str(path),
                         outputs=outputs or "probabilities", input_range=DEEPID_INPUT_RANGE)
        return attach_info(model, info)
    if not h5.is_full_model:
        deepid_from_keras(path, h5)  # raises: a weights-only file must fit DeepID
    from ..convert.keras_to_onnx import keras_to_onnx  # needs the [convert] extra

    return _load_onnx(path, keras_to_onnx(path), outputs)


def _read_record(directory: Path) -> dict:
    meta_path = directory / MODEL_JSON
    if not meta_path.exists():
        raise file_error(directory, f"not a bdpruning model directory (no {MODEL_JSON})")
    try:
        meta = json.loads(meta_path.read_text())
        meta["num_classes"] = int(meta["num_classes"])
        meta["input_shape"] = tuple(int(s) for s in meta["input_shape"])
        meta["removed"] = [(str(step["layer"]), [int(c) for c in step["channels"]])
                           for step in meta.get("removed", [])]
        meta["architecture"] = str(meta["architecture"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise file_error(meta_path, f"invalid model description ({exc})") from None
    if meta.get("format") != FORMAT:
        raise file_error(meta_path, f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("outputs", "probabilities") not in OUTPUTS:
        raise file_error(meta_path, f"invalid 'outputs' {meta['outputs']!r} (expected one of {', '.join(OUTPUTS)})")
    try:
        check_input_range(meta.get("input_range"), "'input_range'")
    except BdpruningError as exc:
        raise file_error(meta_path, str(exc)) from None
    return meta


def _fill(model: nn.Module, directory: Path, meta: dict, removed: list[tuple[str, list[int]]],
          pruned: dict[str, list[int]]) -> nn.Module:
    """Shrink ``model`` as compaction did, load the weights, re-apply the masks."""
    if removed:  # a compact model: shrink the architecture the same way before loading its weights
        try:
            remove_channels(model.eval(), removed, torch.zeros(1, *meta["input_shape"]), fold=False)
        except BdpruningError as exc:
            raise file_error(directory / MODEL_JSON, f"cannot rebuild the compact model ({exc})") from None
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
        raise file_error(weights, f"weights do not fit {type(model).__name__}: {first}") from None
    _mask(model, pruned, meta.get("shift_kept", []))
    return model


def _mask(model: nn.Module, pruned: dict[str, list[int]], shift_kept: list[str]) -> None:
    for layer, channels in pruned.items():
        if channels:
            prune_channels(model, layer, channels, keep_shift=layer in shift_kept)


def _load_dir(directory: Path, into: nn.Module | None, outputs: str | None) -> nn.Module:
    """A model directory written by :func:`bdpruning.save_model_dir` or a bdprune stage."""
    meta = _read_record(directory)
    architecture, removed, pruned = meta["architecture"], meta["removed"], meta.get("pruned", {})
    onnx_bytes = None
    if into is not None:
        model = _fill(into, directory, meta, removed, pruned)
    elif architecture == "deepid":
        model = _fill(DeepID(meta["num_classes"]), directory, meta, removed, pruned)
    elif architecture == "onnx":
        onnx_bytes = (directory / GRAPH_FILE).read_bytes()
        graph = onnx_to_torch(onnx.load_from_string(onnx_bytes), directory / GRAPH_FILE)
        model = _fill(graph, directory, meta, removed, pruned)
    elif architecture == "adopted":  # without its class: its exported graph, masks renamed
        onnx_bytes = (directory / ONNX_FILE).read_bytes()
        model = onnx_to_torch(onnx.load_from_string(onnx_bytes), directory / ONNX_FILE)
        _mask(model, meta.get("graph_pruned", {}), meta.get("graph_shift_kept", []))
        architecture, removed = "onnx", []  # the exported graph is already compact
    else:
        raise file_error(directory / MODEL_JSON, f"unknown architecture {architecture!r}")
    info = ModelInfo(architecture, meta["num_classes"], meta["input_shape"], str(meta.get("source", directory)),
                     onnx_bytes, removed, outputs or meta.get("outputs", "probabilities"), meta.get("input_range"))
    return attach_info(model.eval(), info)


def load_model(
    path: str | os.PathLike[str],
    device: str | torch.device | None = "auto",
    *,
    into: nn.Module | type[nn.Module] | None = None,
    outputs: str | None = None,
    input_range: str | None = None,
) -> nn.Module:
    """Load a model from a Keras ``.h5``, an ONNX file or a bdpruning model directory.

    DeepID ``.h5`` files (full or weights-only) load without TensorFlow into the named
    :class:`~bdpruning.models.DeepID` (0..255 pixels in, probabilities out); other Keras models go
    through ONNX (needs the ``[convert]`` extra). Every model takes float (N, C, H, W) images; what
    it returns (``ModelInfo.outputs``) is read from its graph or record, and ``outputs``
    (``"logits"`` or ``"probabilities"``) overrides that. ``input_range`` (see
    :data:`bdpruning.models.INPUT_RANGES`) records the pixels it takes where the file cannot say.

    ``into``: a fresh instance of the user's own class (``into=MyNet()``, or the class, built
    with no arguments) for a directory saved from an adopted model: its weights, masks and record
    are loaded into it (compaction is replayed first) and it is returned, parameter names and
    BatchNorm as before saving. Without it such a directory loads as its ONNX graph.
    Layers are found by name with :func:`bdpruning.find_layer`.
    """
    path = Path(path)
    if outputs is not None and outputs not in OUTPUTS:
        raise BdpruningError(f"outputs must be 'logits' or 'probabilities', got {outputs!r}")
    check_input_range(input_range)
    if not path.exists():
        raise file_error(path, "no such file or directory")
    if isinstance(into, type) and issubclass(into, nn.Module):
        into = into()
    if into is not None and not (isinstance(into, nn.Module) and path.is_dir()):
        raise file_error(path, "into= takes an nn.Module (or its class), and loads a model directory "
                               "(saved by save_model_dir)")
    if path.is_dir():
        model = _load_dir(path, into, outputs)
    else:
        with open(path, "rb") as handle:
            head = handle.read(8)
        if head == _HDF5_SIGNATURE or path.suffix.lower() in (".h5", ".hdf5", ".keras"):
            model = _load_keras(path, outputs)
        elif path.suffix.lower() == ".onnx":
            model = _load_onnx(path, _read_onnx(path), outputs)
        else:
            raise file_error(path, "unsupported model file (expected .h5, .onnx or a bdpruning model directory)")
    if input_range is not None:
        model.bdpruning_info.input_range = input_range
    return model.eval().to(resolve_device(device))
