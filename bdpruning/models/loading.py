"""The one model loader: Keras ``.h5``, ONNX files and bdpruning model directories."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import torch
from torch import nn

from ..runtime.devices import resolve_device
from ..errors import file_error
from .keras_h5 import deepid_from_keras, fits_deepid, read_keras_h5
from .directory import load_model_dir, onnx_to_torch
from . import ModelInfo, attach_info

__all__ = ["load_model"]

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _onnx_input_shape(proto: onnx.ModelProto, path: Path) -> tuple[int, int, int]:
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value for d in dims[1:])
    if len(shape) != 3 or not all(shape):
        raise file_error(path, f"ONNX input must be (batch, C, H, W) with fixed C, H, W; got {shape}")
    return shape


def _onnx_num_classes(proto: onnx.ModelProto) -> int:
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value) if dims else 0


def _load_onnx(path: Path, proto: onnx.ModelProto | None = None) -> nn.Module:
    if proto is None:
        try:
            proto = onnx.load(str(path))
        except Exception:  # onnx raises DecodeError and others for non-ONNX bytes
            raise file_error(path, "not an ONNX model") from None
    model = onnx_to_torch(proto, path)
    info = ModelInfo("onnx", _onnx_num_classes(proto), _onnx_input_shape(proto, path), str(path),
                     proto.SerializeToString())
    return attach_info(model, info)


def _load_keras(path: Path) -> nn.Module:
    h5 = read_keras_h5(path)
    if fits_deepid(h5):
        model = deepid_from_keras(path, h5)
        return attach_info(model, ModelInfo("deepid", model.num_classes, (3, 55, 47), str(path)))
    if not h5.is_full_model:
        deepid_from_keras(path, h5)  # raises: a weights-only file must fit DeepID
    from ..convert.keras_to_onnx import keras_to_onnx  # needs the [convert] extra

    return _load_onnx(path, keras_to_onnx(path))


def load_model(path: str | os.PathLike[str], device: str | torch.device | None = "auto") -> nn.Module:
    """Load a model for evaluation from a Keras ``.h5``, an ONNX file or a model directory.

    DeepID ``.h5`` files (full or weights-only) load without TensorFlow into the named
    :class:`~bdpruning.models.DeepID`; other Keras models go through ONNX (needs the
    ``[convert]`` extra). Every model takes float (N, C, H, W) images in 0..255 and returns
    class probabilities; its layers are found by Keras name with :func:`bdpruning.find_layer`.
    """
    path = Path(path)
    if not path.exists():
        raise file_error(path, "no such file or directory")
    if path.is_dir():
        model = load_model_dir(path)
    else:
        with open(path, "rb") as handle:
            head = handle.read(8)
        if head == _HDF5_SIGNATURE or path.suffix.lower() in (".h5", ".hdf5", ".keras"):
            model = _load_keras(path)
        elif path.suffix.lower() == ".onnx":
            model = _load_onnx(path)
        else:
            raise file_error(path, "unsupported model file (expected .h5, .onnx or a bdpruning model directory)")
    return model.eval().to(resolve_device(device))
