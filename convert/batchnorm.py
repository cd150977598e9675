"""Keras ``BatchNormalization`` layers, converted as ONNX ``BatchNormalization`` nodes.

Traced as Keras computes it, an inference BatchNorm is ``x * scale + shift`` on constants, and
both TensorFlow's graph optimiser (constant folding pushes the ``Mul`` into a preceding
``Conv2D``) and tf2onnx's optimiser (``Conv`` + ``BatchNormalization`` fusion) fold it into the
convolution before the graph comes back. Its gamma, beta, moving mean and moving variance are
then gone, and so is the BatchNorm that the criteria (CLP, ANP, RNP) and fine-tuning work on.

So, while tf2onnx traces the model (:func:`batchnorms_fed`), every BatchNorm on channels-last
images (N, H, W, C) or features (N, C) computes ``FusedBatchNormV3`` on its four parameter
vectors given as extra graph inputs: nothing can be folded into a constant that is not there.
Afterwards (:func:`batchnorm_initializers`) those inputs become initializers holding the Keras
layer's values, and each node gets the layer's epsilon and momentum, so onnx2torch imports it as
``nn.BatchNorm2d`` (``nn.BatchNorm1d`` after a Dense), named after the Keras layer. The graph
computes the function Keras computes whatever tf2onnx made of it; a BatchNorm on another axis or
rank, or in another dtype, is traced as Keras computes it (and logged).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .tensorflow_runtime import keras, tf

__all__ = ["FedBatchNorm", "batchnorm_initializers", "batchnorms_fed"]

log = logging.getLogger(__name__)

_PARAMETERS = ("gamma", "beta", "moving_mean", "moving_variance")


@dataclass(frozen=True)
class FedBatchNorm:
    """One Keras BatchNorm layer traced on parameters fed as graph inputs ``{prefix}{parameter}``."""

    layer: Any
    prefix: str

    def input_names(self) -> list[str]:
        return [f"{self.prefix}{parameter}" for parameter in _PARAMETERS]

    def values(self) -> list[np.ndarray]:
        """gamma, beta, moving mean and moving variance (ones or zeros where Keras has none)."""
        layer = self.layer
        channels = int(layer.moving_mean.shape[0])
        gamma = layer.gamma.numpy() if layer.scale else np.ones(channels, np.float32)
        beta = layer.beta.numpy() if layer.center else np.zeros(channels, np.float32)
        return [np.asarray(v, np.float32) for v in (gamma, beta, layer.moving_mean.numpy(), layer.moving_variance.numpy())]


def _layers(model: Any) -> Iterator[Any]:
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _layers(layer)
        else:
            yield layer


def _as_arithmetic(layer: Any, why: str) -> None:
    log.warning("BatchNorm %s (%s) is converted as its arithmetic, not as a BatchNorm module", layer.name, why)


def _fused_call(layer: Any, feeds: dict[int, tuple]) -> Callable:
    def call(inputs: Any, training: Any = None, mask: Any = None) -> Any:
        rank = inputs.shape.rank
        if rank not in (2, 4) or layer.axis not in (-1, rank - 1):
            _as_arithmetic(layer, f"axis {layer.axis} of a rank-{rank} input")
            return type(layer).call(layer, inputs, training=training, mask=mask)
        gamma, beta, mean, variance = feeds[id(layer)]
        channels = inputs.shape[-1]
        images = inputs if rank == 4 else tf.reshape(inputs, [-1, 1, 1, channels])
        outputs = tf.raw_ops.FusedBatchNormV3(x=images, scale=gamma, offset=beta, mean=mean, variance=variance,
                                              epsilon=layer.epsilon, is_training=False)[0]
        return outputs if rank == 4 else tf.reshape(outputs, [-1, channels])

    return call


@contextlib.contextmanager
def batchnorms_fed(model: Any) -> Iterator[tuple[list[FedBatchNorm], tuple, Callable]]:
    """While open: the model's BatchNorms as :class:`FedBatchNorm`, the ``tf.TensorSpec`` of
    their parameters, and ``call(images, *parameters)``, the model in inference on them.

    Without a BatchNorm, ``call`` is ``model(images, training=False)`` and no spec is added.
    """
    layers = {id(layer): layer for layer in _layers(model) if isinstance(layer, keras.layers.BatchNormalization)}
    for layer in [layer for layer in layers.values() if layer.compute_dtype != "float32"]:
        _as_arithmetic(layer, f"computed in {layer.compute_dtype}")
        del layers[id(layer)]
    fed = [FedBatchNorm(layer, f"batchnorm{i}_") for i, layer in enumerate(layers.values())]
    specs = tuple(tf.TensorSpec((int(bn.layer.moving_mean.shape[0]),), tf.float32, name=name)
                  for bn in fed for name in bn.input_names())
    feeds: dict[int, tuple] = {}

    def call(images: Any, *parameters: Any) -> Any:
        for i, bn in enumerate(fed):
            feeds[id(bn.layer)] = parameters[4 * i: 4 * i + 4]
        return model(images, training=False)

    own = {key: layer.__dict__.get("call") for key, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.call = _fused_call(layer, feeds)
        yield fed, specs, call
    finally:
        for key, layer in layers.items():
            if own[key] is None:
                del layer.call
            else:
                layer.call = own[key]


def batchnorm_initializers(proto: onnx.ModelProto, fed: list[FedBatchNorm]) -> None:
    """Turn the parameter inputs of ``fed`` into initializers with the Keras values, give their
    ``BatchNormalization`` nodes the layers' epsilon and momentum, and let a BatchNorm of
    features (traced as images of 1 x 1 pixel) read and write the (N, C) tensors (in place)."""
    graph = proto.graph
    read = {name for node in graph.node for name in node.input}
    owners = {name: bn.layer for bn in fed for name in bn.input_names()}
    kept = [value for value in graph.input if value.name not in owners]
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(value, name) for bn in fed
                             for name, value in zip(bn.input_names(), bn.values()) if name in read)
    for node in graph.node:
        layer = owners.get(node.input[1]) if node.op_type == "BatchNormalization" else None
        if layer is not None:
            attributes = [a for a in node.attribute if a.name not in ("epsilon", "momentum")]
            del node.attribute[:]
            node.attribute.extend([*attributes, helper.make_attribute("epsilon", float(layer.epsilon)),
                                   helper.make_attribute("momentum", float(layer.momentum))])
    _features_without_reshapes(proto)


def _features_without_reshapes(proto: onnx.ModelProto) -> None:
    """``Reshape(BatchNormalization(Reshape(x, (N, C, 1, 1))), (N, C))`` -> ``BatchNormalization(x)``."""
    graph = proto.graph
    shapes = {info.name: [d.dim_value for d in info.type.tensor_type.shape.dim]
              for info in onnx.shape_inference.infer_shapes(proto).graph.value_info}
    for node in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        before = [n for n in graph.node if node.input[0] in n.output]
        after = [n for n in graph.node if node.output[0] in n.input]
        if [n.op_type for n in before + after] != ["Reshape", "Reshape"]:
            continue
        features, images, result = (shapes.get(name, []) for name in (before[0].input[0], node.output[0], after[0].output[0]))
        if len(features) != 2 or len(result) != 2 or images[1:] != [features[1], 1, 1] or result[1] != features[1]:
            continue
        node.input[0], node.output[0] = before[0].input[0], after[0].output[0]
        removed = [after[0], *[n for n in before if not any(n.output[0] in other.input for other in graph.node)]]
        for reshape in removed:
            graph.node.remove(reshape)
        read = {name for n in graph.node for name in n.input}
        for init in [i for i in graph.initializer if i.name in {r.input[1] for r in removed} - read]:
            graph.initializer.remove(init)
