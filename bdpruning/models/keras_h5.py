"""Reading Keras 2 ``.h5`` files with h5py alone (no TensorFlow, never any embedded code).

Two layouts are accepted: a full model (``model_config`` attribute + ``model_weights`` group,
as the course ships ``bd_net.h5``) and a weights-only file (``save_weights``). Layers that
carry code (``Lambda``) or are not built into Keras are refused by name.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from ..runtime.atomic import atomic_path
from ..errors import BdpruningError, file_error
from ..pruning.masks import plain_state_dict
from .record import model_info
from .deepid import DEEPID_INPUT_SHAPE, DeepID

__all__ = [
    "KerasH5",
    "read_keras_h5",
    "deepid_from_keras",
    "deepid_state_dict",
    "write_deepid_weights",
    "write_keras_copy",
    "fits_deepid",
    "image_input_shape",
    "nhwc_rows_to_nchw",
    "nchw_rows_to_nhwc",
]

#: The layer classes of the DeepID architecture: a file made only of these is checked without
#: TensorFlow. For any other class, Keras itself says whether it is built in (see
#: :func:`_builtin_in_keras`).
_DEEPID_CLASSES = frozenset(
    "InputLayer Conv2D MaxPooling2D Flatten Dense Add Activation Functional Model Sequential".split())

# Keras name -> kernel shape for DeepID (None: any size, the class count).
_DEEPID_KERNELS: dict[str, tuple[int | None, ...]] = {
    "conv_1": (4, 4, 3, 20),
    "conv_2": (3, 3, 20, 40),
    "conv_3": (3, 3, 40, 60),
    "conv_4": (2, 2, 60, 80),
    "fc_1": (1200, 160),
    "fc_2": (960, 160),
    "output": (160, None),
}
# (H, W, C) of the NHWC tensors that Keras flattens into fc_1 and fc_2.
_FLATTENED = {"fc_1": (5, 4, 60), "fc_2": (4, 3, 80)}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclass
class KerasH5:
    """What a Keras ``.h5`` holds: its config (full models only) and weights by layer."""

    path: Path
    keras_version: str
    model_config: dict | None
    layer_names: list[str]
    weights: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def is_full_model(self) -> bool:
        return self.model_config is not None

    def layer_classes(self) -> dict[str, str]:
        """Layer name -> Keras class name, from the config (empty for weights-only files)."""
        return {layer["name"]: layer["class_name"] for layer in _config_layers(self.model_config)}


def _config_layers(config: dict | None) -> list[dict]:
    if not config:
        return []
    inner = config.get("config", config)
    layers = inner.get("layers", []) if isinstance(inner, dict) else inner
    found = []
    for layer in layers:
        layer = dict(layer)
        layer.setdefault("name", layer.get("config", {}).get("name", "?"))
        found.append(layer)
        if layer.get("class_name") in ("Functional", "Model", "Sequential"):
            found.extend(_config_layers(layer))
    return found


def _check_layers(path: Path, config: dict) -> None:
    for layer in _config_layers(config):
        cls = layer.get("class_name")
        if cls == "Lambda":
            raise file_error(
                path,
                f"layer {layer['name']!r} is a Keras Lambda layer: it holds code, and bdpruning "
                "never executes code embedded in a model file",
            )
        if cls not in _DEEPID_CLASSES and not _builtin_in_keras(path, cls):
            raise file_error(
                path,
                f"layer {layer['name']!r} has class {cls!r}, which is not a built-in Keras layer "
                "(custom layers need code that bdpruning will not load)",
            )


def _builtin_in_keras(path: Path, class_name: str) -> bool:
    """Whether Keras itself has ``class_name`` among its built-in layers, which its safe-mode
    loading rebuilds without code from the file (imports TensorFlow: the [convert] extra)."""
    try:
        from ..convert.tensorflow_runtime import keras
    except ImportError:
        raise file_error(path, f"layer class {class_name!r} needs Keras to check: "
                               "pip install 'bdpruning[convert]'") from None
    found = getattr(keras.layers, class_name, None) if isinstance(class_name, str) else None
    return isinstance(found, type) and issubclass(found, keras.layers.Layer) and class_name != "Lambda"


def read_keras_h5(path: str | os.PathLike[str]) -> KerasH5:
    """Read a Keras 2 ``.h5`` (full model or weights only) without TensorFlow."""
    path = Path(path)
    if not path.exists():
        raise file_error(path, "no such file")
    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise file_error(path, "not an HDF5 file") from None
    with handle:
        config = None
        if "model_config" in handle.attrs:
            try:
                config = json.loads(_text(handle.attrs["model_config"]))
            except json.JSONDecodeError:
                raise file_error(path, "'model_config' is not valid JSON") from None
            _check_layers(path, config)
        group = handle["model_weights"] if "model_weights" in handle else handle
        if "layer_names" not in group.attrs:
            raise file_error(
                path,
                "HDF5 file without Keras layers (no 'layer_names'); expected a Keras model "
                "or a file written by save_weights",
            )
        names = [_text(n) for n in group.attrs["layer_names"]]
        weights: dict[str, dict[str, np.ndarray]] = {}
        for name in names:
            if name not in group:
                raise file_error(path, f"layer {name!r} is listed but has no weights group")
            layer = group[name]
            arrays = {}
            for weight_name in (_text(w) for w in layer.attrs.get("weight_names", [])):
                short = weight_name.rsplit("/", 1)[-1].split(":")[0]
                arrays[short] = np.asarray(layer[weight_name])
            weights[name] = arrays
        version = _text(handle.attrs.get("keras_version", group.attrs.get("keras_version", "?")))
    return KerasH5(path, version, config, names, weights)


def _input_shapes(config: dict) -> list[tuple]:
    """Each model input's batch shape, from the ``InputLayer`` configs (Keras 2 or 3 names)."""
    shapes = []
    for layer in _config_layers(config):
        if layer.get("class_name") == "InputLayer":
            settings = layer.get("config", {})
            shape = settings.get("batch_shape", settings.get("batch_input_shape"))
            if shape is not None:
                shapes.append(tuple(shape))
    return shapes


def _endpoints(config: dict, key: str) -> int | None:
    inner = config.get("config", {})
    value = inner.get(key) if isinstance(inner, dict) else None
    if value is None:
        return None
    return 1 if value and isinstance(value[0], str) else len(value)  # Keras 3 writes one as a flat list


def image_input_shape(h5: KerasH5) -> tuple[int, int, int]:
    """The ``(C, H, W)`` a Keras file's model takes, read from its config without TensorFlow.

    Weights-only files are DeepID (3, 55, 47). Raises naming the file unless the model has one
    image input of fixed size ``(N, H, W, C)`` and one output.
    """
    if not h5.is_full_model:
        return DEEPID_INPUT_SHAPE
    shapes = _input_shapes(h5.model_config)
    outputs = _endpoints(h5.model_config, "output_layers")
    image = len(shapes) == 1 and len(shapes[0]) == 4 and None not in shapes[0][1:]
    if not image or outputs not in (None, 1):
        raise file_error(h5.path, "expected a model with one image input of fixed size (N, H, W, C) and "
                                  f"one output; it takes {shapes}")
    _, height, width, channels = shapes[0]
    return int(channels), int(height), int(width)


def _deepid_mismatch(h5: KerasH5) -> str | None:
    for name, expected in _DEEPID_KERNELS.items():
        layer = h5.weights.get(name)
        if layer is None or "kernel" not in layer or "bias" not in layer:
            return f"no kernel and bias for layer {name!r}"
        shape = layer["kernel"].shape
        if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
            shown = tuple("N" if e is None else e for e in expected)
            return f"layer {name!r} has kernel shape {shape}, DeepID expects {shown}"
    extra = sorted(n for n, w in h5.weights.items() if w and n not in _DEEPID_KERNELS)
    if extra:
        return f"weighted layers DeepID does not have: {', '.join(extra)}"
    return None


def fits_deepid(h5: KerasH5) -> bool:
    """Whether the file's weights (and config, if any) are those of DeepID."""
    if _deepid_mismatch(h5) is not None:
        return False
    classes = h5.layer_classes()
    return not classes or all(classes.get(n) in ("Conv2D", "Dense") for n in _DEEPID_KERNELS)


def nhwc_rows_to_nchw(kernel: np.ndarray, h: int, w: int, c: int) -> np.ndarray:
    """A Dense kernel's rows from Keras' flatten order of (H, W, C) tensors to PyTorch's (C, H, W)."""
    return kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)


def nchw_rows_to_nhwc(kernel: np.ndarray, h: int, w: int, c: int) -> np.ndarray:
    """The inverse of :func:`nhwc_rows_to_nchw`: rows back to Keras' (H, W, C) flatten order."""
    return kernel.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)


def deepid_state_dict(h5: KerasH5) -> dict[str, torch.Tensor]:
    """DeepID's PyTorch state dict from Keras weights (kernels transposed, flatten order fixed)."""
    state = {}
    for name in _DEEPID_KERNELS:
        kernel, bias = h5.weights[name]["kernel"], h5.weights[name]["bias"]
        if kernel.ndim == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
            weight = kernel.transpose(3, 2, 0, 1)
        elif name in _FLATTENED:  # rows in NHWC flatten order -> columns in NCHW order
            h, w, c = _FLATTENED[name]
            weight = nhwc_rows_to_nchw(kernel, h, w, c).T
        else:
            weight = kernel.T
        state[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
        state[f"{name}.bias"] = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
    return state


def deepid_from_keras(path: str | os.PathLike[str], h5: KerasH5 | None = None) -> DeepID:
    """Build :class:`DeepID` from a Keras ``.h5`` with h5py alone; refuse files that do not fit."""
    h5 = h5 or read_keras_h5(path)
    problem = _deepid_mismatch(h5)
    if problem is not None:
        raise file_error(path, f"weights do not fit the DeepID architecture: {problem}")
    num_classes = h5.weights["output"]["kernel"].shape[1]
    model = DeepID(num_classes)
    model.load_state_dict(deepid_state_dict(h5))
    return model.eval()


def write_keras_copy(model: nn.Module, out: str | os.PathLike[str]) -> bool:
    """Write ``model``'s weights to ``out`` in the layout of the DeepID Keras ``.h5`` it was loaded
    from (see :func:`write_deepid_weights`); return False, writing nothing, for any other model."""
    info = model_info(model)
    source = Path(info.source)
    if info.architecture != "deepid" or source.suffix.lower() not in (".h5", ".hdf5") or not source.exists():
        return False
    write_deepid_weights(model, source, out)
    return True


def write_deepid_weights(model: DeepID, template: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Write ``model``'s weights into a copy of the Keras ``.h5`` it came from (same layout).

    Users of the original Keras tools load the result exactly as they loaded the template.
    """
    template = Path(template)
    h5 = read_keras_h5(template)
    if _deepid_mismatch(h5) is not None or h5.weights["output"]["kernel"].shape[1] != model.num_classes:
        raise BdpruningError(f"{template}: not a DeepID file with {model.num_classes} classes")
    state = {k: v.numpy() for k, v in plain_state_dict(model).items()}
    with atomic_path(out) as tmp:
        shutil.copyfile(template, tmp)
        with h5py.File(tmp, "r+") as target:
            group = target["model_weights"] if "model_weights" in target else target
            for name in _DEEPID_KERNELS:
                weight, bias = state[f"{name}.weight"], state[f"{name}.bias"]
                if weight.ndim == 4:
                    kernel = weight.transpose(2, 3, 1, 0)
                elif name in _FLATTENED:
                    h, w, c = _FLATTENED[name]
                    kernel = nchw_rows_to_nhwc(weight.T, h, w, c)
                else:
                    kernel = weight.T
                layer = group[name]
                for short, value in (("kernel", kernel), ("bias", bias)):
                    # Keras 2 names weights "conv_1/kernel:0", Keras 3 "conv_1/kernel"
                    key = next(_text(w) for w in layer.attrs["weight_names"]
                               if _text(w).rsplit("/", 1)[-1].split(":")[0] == short)
                    layer[key][...] = value.astype(layer[key].dtype)

