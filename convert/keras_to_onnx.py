"""Keras ``.h5`` -> Keras model -> ONNX with tf2onnx, never executing code from the file.

Every file is read with h5py first (:func:`bdpruning.models.keras_h5.read_keras_h5` refuses ``Lambda``
and custom layers by name) before Keras sees it; Keras then loads it with ``safe_mode=True``.
Weights-only files (``save_weights``) are loaded into the built-in Keras DeepID.

The ONNX graph takes float NCHW images named ``input`` (dynamic batch, raw 0..255) and returns
``output``; its nodes carry the Keras layer names, so :func:`bdpruning.find_layer` finds
``conv_3`` in the onnx2torch module too; Keras BatchNorms stay BatchNorms (:mod:`.batchnorm`).
TensorFlow comes from :mod:`.tensorflow_runtime`, which imports torch and torchvision first
(importing torchvision after TensorFlow segfaults).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Iterator

import onnx
import torch

from .batchnorm import batchnorm_initializers, batchnorms_fed
from .graph_passes import simplify, unconvertible_nodes  # onnx2torch
from .keras_deepid import build_keras_deepid
from .tensorflow_runtime import keras, tf, tf2onnx  # torch first, start-up messages kept quiet
from ..errors import file_error
from ..models.keras_h5 import KerasH5, deepid_from_keras, fits_deepid, read_keras_h5
from ..models.onnx_graph import ONNX_OPSET

__all__ = ["load_keras", "to_onnx", "keras_to_onnx", "toolchain_versions"]

log = logging.getLogger(__name__)


def load_keras(path: str | os.PathLike[str], h5: KerasH5 | None = None) -> keras.Model:
    """Load a Keras ``.h5`` (full model, or DeepID weights only) into Keras, safely."""
    h5 = h5 or read_keras_h5(path)  # refuses Lambda and custom layers before Keras sees the file
    if not h5.is_full_model:
        if not fits_deepid(h5):
            deepid_from_keras(path, h5)  # raises, naming the layer that does not fit
        model = build_keras_deepid(h5.weights["output"]["kernel"].shape[1])
        for layer in model.layers:
            if layer.weights:
                layer.set_weights([h5.weights[layer.name]["kernel"], h5.weights[layer.name]["bias"]])
        return model
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for files it cannot rebuild
        raise file_error(path, f"Keras cannot load this model: {_first_line(exc)}") from None
    shape = model.inputs[0].shape
    if len(model.inputs) != 1 or len(model.outputs) != 1 or len(shape) != 4 or None in shape[1:]:
        raise file_error(path, f"expected a model with one image input of fixed size (N, H, W, C) and "
                               f"one output; it takes {[tuple(i.shape) for i in model.inputs]}")
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_tf2onnx() -> Iterator[None]:
    """tf2onnx logs every step at INFO; bdpruning reports the problems itself."""
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    if not log.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _all_layer_names(model: keras.Model) -> set[str]:
    names = {model.name}
    for layer in model.layers:
        names |= _all_layer_names(layer) if isinstance(layer, keras.Model) else {layer.name}
    return names


def _restore_keras_names(proto: onnx.ModelProto, model: keras.Model) -> None:
    """Rename nodes ``model_1_1/conv_3_1/BiasAdd`` -> ``model_1/conv_3/BiasAdd``.

    Keras 3 enters each layer's TensorFlow name scope twice while tracing, so every scope gets
    the same uniquifying suffix as the model's own; strip it where it leaves a Keras layer name.
    """
    tops = {node.name.split("/", 1)[0] for node in proto.graph.node if "/" in node.name}
    suffix = next(
        (top[len(model.name):] for top in tops if re.fullmatch(re.escape(model.name) + r"_\d+", top)),
        None,
    )
    if suffix is None:
        return
    names = _all_layer_names(model)

    def fix(part: str) -> str:
        base = part[: -len(suffix)] if part.endswith(suffix) else part
        return base if base in names else part

    for node in proto.graph.node:
        node.name = "/".join(fix(part) for part in node.name.split("/"))


def _name_output(proto: onnx.ModelProto, name: str = "output") -> None:
    """Call the graph's single output ``output``, as bdpruning's own ONNX exports do."""
    old = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
        node.input[:] = [name if i == old else i for i in node.input]
    proto.graph.output[0].name = name


def to_onnx(model: keras.Model, source: str | os.PathLike[str], optimize: bool = True) -> onnx.ModelProto:
    """Export ``model`` with tf2onnx: NCHW float input ``input`` (dynamic batch), output ``output``.

    Keras BatchNorms become ``BatchNormalization`` nodes with the layers' parameters
    (:mod:`bdpruning.convert.batchnorm`). ``optimize`` removes the NHWC transposes tf2onnx keeps
    for Keras ``Flatten`` layers (:func:`bdpruning.convert.graph_passes.simplify`); the function
    computed stays the same.

    Raises :class:`~bdpruning.errors.BdpruningError` naming the layers and operators that
    tf2onnx or onnx2torch cannot convert.
    """
    spec = (tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32, name="input"),)
    try:
        with _quiet_tf2onnx(), batchnorms_fed(model) as (batchnorms, parameters, call):
            proto, _ = tf2onnx.convert.from_function(
                tf.function(call, autograph=False), input_signature=spec + parameters, opset=ONNX_OPSET,
                inputs_as_nchw=["input"],
            )
    except Exception as exc:  # tf2onnx raises plain exceptions for unsupported graphs
        raise file_error(source, f"tf2onnx cannot convert this model: {_first_line(exc)}") from None
    batchnorm_initializers(proto, batchnorms)
    _restore_keras_names(proto, model)
    _name_output(proto)
    if optimize:
        simplify(proto)
    bad = unconvertible_nodes(proto)
    if bad:
        layers = _layers_of(bad, _all_layer_names(model))
        ops = sorted({node.op_type for node in bad})
        raise file_error(
            source,
            f"layer(s) {', '.join(layers)} cannot be converted to PyTorch "
            f"(unsupported operator(s): {', '.join(ops)})",
        )
    return proto


def _layers_of(nodes: list[onnx.NodeProto], names: set[str]) -> list[str]:
    found = []
    for node in nodes:
        parts = [part for part in node.name.split("/") if part in names]
        layer = parts[-1] if parts else node.name
        if layer not in found:
            found.append(layer)
    return found


def keras_to_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """The ONNX graph of a Keras ``.h5`` (see :func:`load_keras` and :func:`to_onnx`)."""
    return to_onnx(load_keras(path), Path(path))


def toolchain_versions() -> dict[str, str]:
    """Versions of the libraries a conversion used, for ``conversion.json``."""
    from importlib.metadata import version

    import onnxruntime

    return {
        "torch": torch.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tf2onnx": tf2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx2torch": version("onnx2torch"),  # the package has no __version__
    }
