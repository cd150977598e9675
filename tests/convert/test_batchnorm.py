"""Keras BatchNorms survive conversion: a converted Keras BN net holds ``nn.BatchNorm2d`` (and
``nn.BatchNorm1d`` after a Dense) modules with the layers' gamma, beta, moving statistics,
epsilon and momentum, named after the Keras layers, within float32 round-off of Keras; pruning
a conv masks the BatchNorm after it and compaction removes the channel from both."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bdpruning
from bdpruning.pruning.compaction import compact_model
from bdpruning.pruning.masks import following_batchnorm

pytestmark = pytest.mark.tensorflow
SHAPE = (3, 12, 12)


def _keras():
    if importlib.util.find_spec("tf2onnx") is None:  # importorskip would import TensorFlow first
        pytest.skip("needs the [convert] extra")
    from bdpruning.convert.tensorflow_runtime import keras

    return keras


def _set_batchnorms(model, seed: int) -> None:
    """Statistics far from the initial ones (gamma 1, beta 0, mean 0, variance 1)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, _keras().layers.BatchNormalization):
            layer.set_weights([(rng.uniform(0.3, 2.5, w.shape) if w.name in ("gamma", "moving_variance")
                                else rng.normal(0.0, 0.7, w.shape)).astype(np.float32) for w in layer.weights])


def _parameters(layer) -> dict[str, np.ndarray]:
    """What Keras computes with: gamma 1 without a scale, beta 0 without a shift."""
    channels = layer.moving_mean.shape[0]
    return {"gamma": layer.gamma.numpy() if layer.scale else np.ones(channels, np.float32),
            "beta": layer.beta.numpy() if layer.center else np.zeros(channels, np.float32),
            "mean": layer.moving_mean.numpy(), "variance": layer.moving_variance.numpy(),
            "epsilon": layer.epsilon, "momentum": layer.momentum}


@pytest.fixture(scope="module")
def keras_bn_net(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """A Keras net with a BatchNorm after a conv, after a ReLU (no shift), after a Dense (no
    scale), saved as .h5; each BatchNorm's parameters, epsilon and momentum."""
    keras = _keras()
    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((12, 12, 3), name="input")
    x = layers.Rescaling(1 / 255, name="scale")(inputs)
    x = layers.Conv2D(6, 3, padding="same", name="conv_a")(x)
    x = layers.BatchNormalization(name="bn_a", epsilon=1e-5, momentum=0.9)(x)
    x = layers.ReLU(name="relu_a")(x)
    x = layers.BatchNormalization(name="bn_r", center=False)(x)
    x = layers.Conv2D(8, 3, activation="relu", name="conv_b")(x)
    x = layers.MaxPooling2D(2, name="pool_b")(x)
    x = layers.Dense(10, name="fc")(layers.Flatten(name="flat")(x))
    x = layers.ReLU(name="relu_fc")(layers.BatchNormalization(name="bn_fc", scale=False)(x))
    outputs = layers.Dense(4, activation="softmax", name="output")(x)
    model = keras.Model(inputs, outputs, name="bn_net")
    _set_batchnorms(model, seed=1)
    path = tmp_path_factory.mktemp("keras_bn") / "bn_net.h5"
    model.save(path)
    return path, {layer.name: _parameters(layer) for layer in model.layers
                  if isinstance(layer, layers.BatchNormalization)}


@pytest.fixture(scope="module")
def converted(keras_bn_net, tmp_path_factory) -> tuple[Path, dict]:
    from bdpruning.workflows.convert import convert_keras

    out = tmp_path_factory.mktemp("converted") / "bn_net"
    return out, convert_keras(keras_bn_net[0], out, samples=128)


def test_a_converted_keras_bn_net_holds_batchnorm_modules_with_the_keras_parameters(keras_bn_net, converted):
    model = bdpruning.load_model(converted[0], device="cpu")
    kinds = {"bn_a": nn.BatchNorm2d, "bn_r": nn.BatchNorm2d, "bn_fc": nn.BatchNorm1d}
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) == len(kinds)
    for name, kind in kinds.items():
        norm, keras_values = bdpruning.find_layer(model, name)[1], keras_bn_net[1][name]  # named as in Keras
        assert type(norm) is kind
        assert np.array_equal(norm.weight.detach().numpy(), keras_values["gamma"])
        assert np.array_equal(norm.bias.detach().numpy(), keras_values["beta"])
        assert np.array_equal(norm.running_mean.numpy(), keras_values["mean"])
        assert np.array_equal(norm.running_var.numpy(), keras_values["variance"])
        assert norm.eps == pytest.approx(keras_values["epsilon"], rel=1e-6)
        assert norm.momentum == pytest.approx(1 - keras_values["momentum"], rel=1e-5)  # training updates as in Keras


def test_the_batchnorm_net_is_within_round_off_of_keras(converted):
    _, report = converted
    assert report["passed"], report["failures"]
    for backend in ("keras", "onnxruntime", "onnx2torch"):  # each against the float64 reference
        assert report["backends"][backend]["explained_by_round_off"]
    assert report["backends"]["onnx2torch"]["safe_top1_agreement"] == 1.0


def test_a_batchnorm_differing_from_keras_fails_parity(keras_bn_net, converted):
    """The parity judgement sees a BatchNorm that is not Keras': a moving mean off by 0.05. The
    reference is the converted weights, so Keras (and the unchanged ONNX graph) fail against it."""
    from bdpruning.convert.keras_to_onnx import load_keras
    from bdpruning.convert.parity import random_images
    from bdpruning.workflows.convert import check_parity

    model = bdpruning.load_model(converted[0], device="cpu")
    with torch.no_grad():
        bdpruning.find_layer(model, "bn_a")[1].running_mean += 0.05
    onnx_bytes = (converted[0] / "model.onnx").read_bytes()
    report = check_parity(load_keras(keras_bn_net[0]), onnx_bytes, model, None, random_images(64, SHAPE, 3))
    assert not report["passed"]
    assert any(failure.startswith("keras's") for failure in report["failures"])
    assert not any(failure.startswith("onnx2torch") for failure in report["failures"])


def test_pruning_a_converted_conv_masks_its_batchnorm_and_compaction_removes_both(converted):
    model = bdpruning.load_model(converted[0], device="cpu").double().eval()
    conv, norm = bdpruning.find_layer(model, "conv_a")[0], bdpruning.find_layer(model, "bn_a")[0]
    assert following_batchnorm(model, "conv_a") == norm
    bdpruning.prune_channels(model, "conv_a", [1, 4])
    seen = {}
    handle = model.get_submodule(norm).register_forward_hook(lambda _m, _i, out: seen.update(out=out))
    images = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (16, *SHAPE))).double()
    with torch.no_grad():
        expected = model(images)
    handle.remove()
    assert torch.equal(seen["out"][:, [1, 4]], torch.zeros_like(seen["out"][:, [1, 4]]))  # shift masked too
    assert seen["out"][:, [0, 2, 3, 5]].abs().amax(dim=(0, 2, 3)).all()  # the kept channels live
    compact_model(model, "conv_a")
    assert model.get_submodule(conv).out_channels == model.get_submodule(norm).num_features == 4
    with torch.no_grad():
        assert (model(images) - expected).abs().max() <= 1e-12


def test_a_batchnorm_on_another_axis_is_converted_as_its_arithmetic_and_says_so(tmp_path, caplog):
    keras = _keras()
    from bdpruning.workflows.convert import convert_keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((12, 12, 3), name="input")
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = layers.BatchNormalization(axis=1, name="bn_rows")(x)  # one statistic per image row
    outputs = layers.Dense(3, activation="softmax", name="output")(layers.Flatten(name="flat")(x))
    model = keras.Model(inputs, outputs, name="rows")
    _set_batchnorms(model, seed=2)
    model.save(tmp_path / "rows.h5")
    with caplog.at_level(logging.WARNING, logger="bdpruning.convert.batchnorm"):
        report = convert_keras(tmp_path / "rows.h5", tmp_path / "out", samples=64)
    assert report["passed"], report["failures"]
    assert any("bn_rows" in r.getMessage() and "arithmetic" in r.getMessage() for r in caplog.records)
    converted = bdpruning.load_model(tmp_path / "out", device="cpu")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
