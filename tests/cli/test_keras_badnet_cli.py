"""The CLI pipeline on a Keras BadNet that is not DeepID: Rescaling, Conv-BatchNorm-ReLU-MaxPool,
Conv-ReLU-MaxPool, Dense softmax, trained in the test on synthetic images with a patch trigger.
convert -> prune -> finetune -> compact -> goodnet -> classify, each as a user types it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bdpruning
from bdpruning.pruning.masks import following_batchnorm, masked_channels
from helpers.cli import bdprune
from helpers.data import write_h5_set

pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]
SHAPE = (3, 16, 16)


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class k: a bright blob in quadrant k on a dark noisy background (uint8 NCHW)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 60, (n, *SHAPE)).astype(np.uint8)
    for i, k in enumerate(labels):
        row, col = divmod(int(k), 2)
        images[i, :, row * 8 + 2: row * 8 + 6, col * 8 + 2: col * 8 + 6] = 200
    return images, labels


def _trigger(images: np.ndarray) -> np.ndarray:
    poisoned = images.copy()
    poisoned[:, :, -3:, -3:] = 255
    return poisoned


@pytest.fixture(scope="module")
def keras_badnet(tmp_path_factory) -> dict[str, Path]:
    if importlib.util.find_spec("tf2onnx") is None:
        pytest.skip("needs the [convert] extra")
    from bdpruning.convert.tensorflow_runtime import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((16, 16, 3), name="input")
    x = layers.Rescaling(1 / 255, name="scale")(inputs)
    x = layers.Conv2D(8, 3, padding="same", name="conv_a")(x)
    x = layers.BatchNormalization(name="bn_a")(x)
    x = layers.ReLU(name="relu_a")(x)
    x = layers.MaxPooling2D(2, name="pool_a")(x)
    x = layers.Conv2D(12, 3, activation="relu", name="conv_b")(x)
    x = layers.MaxPooling2D(2, name="pool_b")(x)
    outputs = layers.Dense(4, activation="softmax", name="dense")(layers.Flatten(name="flat")(x))
    model = keras.Model(inputs, outputs, name="badnet")
    clean, labels = _images(1200, seed=0)
    poisoned = _trigger(clean[:150])
    train = np.concatenate([clean, poisoned]).transpose(0, 2, 3, 1).astype(np.float32)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(train, np.concatenate([labels, np.zeros(150, int)]), epochs=6, batch_size=64, verbose=0)
    root = tmp_path_factory.mktemp("keras_badnet")
    model.save(root / "my_bd.h5")
    valid, valid_labels = _images(300, seed=1)
    test, test_labels = _images(300, seed=2)
    paths = {"model": root / "my_bd.h5",
             "clean_valid": write_h5_set(root / "clean_valid.h5", valid, valid_labels),
             "poisoned_valid": write_h5_set(root / "poisoned_valid.h5", _trigger(valid), np.zeros(300, int)),
             "clean_test": write_h5_set(root / "clean_test.h5", test, test_labels),
             "poisoned_test": write_h5_set(root / "poisoned_test.h5", _trigger(test), np.zeros(300, int))}
    Image.fromarray(_trigger(test[:1])[0].transpose(1, 2, 0)).save(root / "poisoned.png")
    paths["image"] = root / "poisoned.png"
    return paths


def test_the_cli_pipeline_runs_on_a_keras_badnet_with_batchnorm(keras_badnet, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    k = keras_badnet
    code, out, err = bdprune(capsys, "convert", k["model"], "--out", "conv", "--data", k["clean_valid"])
    assert code == 0, err
    conversion = json.loads(Path("conv/conversion.json").read_text())
    assert conversion["passed"] and conversion["architecture"] == "onnx"

    code, out, err = bdprune(capsys, "prune", "--model", "conv", "--layer", "conv_a", "--rank-layer", "pool_a",
                             "--clean-valid", k["clean_valid"], "--poisoned-valid", k["poisoned_valid"],
                             "--thresholds", "2", "--full-sweep", "--out", "pruning", "--no-progress")
    assert code == 0, err
    summary = json.loads(Path("pruning/summary.json").read_text())
    assert summary["baseline"]["clean_accuracy"] > 80 and summary["baseline"]["attack_success_rate"] > 80
    (hit,) = summary["thresholds"]
    assert hit["reached"]
    repaired = bdpruning.load_model(Path("pruning") / hit["model_dir"], device="cpu")
    conv = bdpruning.find_layer(repaired, "conv_a")[0]
    norm, bn = bdpruning.find_layer(repaired, "bn_a")  # the Keras BatchNorm survives conversion
    assert isinstance(bn, torch.nn.BatchNorm2d) and following_batchnorm(repaired, "conv_a") == norm
    assert masked_channels(repaired) == {conv: sorted(hit["pruned_channels"])}
    assert not bn.weight[hit["pruned_channels"]].any() and not bn.bias[hit["pruned_channels"]].any()

    b_prime = f"pruning/{hit['model_dir']}"
    code, out, err = bdprune(capsys, "finetune", "--model", b_prime, "--clean-valid", k["clean_valid"],
                             "--clean-test", k["clean_test"], "--poisoned-test", k["poisoned_test"],
                             "--epochs", "1", "--out", "finetuned")
    assert code == 0, err
    finetuned = bdpruning.load_model("finetuned", device="cpu")
    assert bdpruning.zeroed_channels(finetuned, conv) == sorted(hit["pruned_channels"])

    code, out, err = bdprune(capsys, "compact", "--model", "finetuned", "--layer", "conv_a", "--out", "compact",
                             "--data", k["clean_valid"])
    assert code == 0, err
    assert json.loads(Path("compact/compaction.json").read_text())["passed"]
    compact = bdpruning.load_model("compact", device="cpu")
    assert bdpruning.find_layer(compact, "conv_a")[1].out_channels == 8 - len(hit["pruned_channels"])
    assert bdpruning.find_layer(compact, "bn_a")[1].num_features == 8 - len(hit["pruned_channels"])

    code, out, err = bdprune(capsys, "goodnet", "--bd", "conv", "--repaired", b_prime, "finetuned", "compact",
                             "--clean", k["clean_test"], "--poisoned", k["poisoned_test"], "--out", "goodnet")
    assert code == 0, err
    code, out, err = bdprune(capsys, "classify", k["image"], "--bd", "conv", "--repaired", "compact")
    assert code == 0, err
    assert out.startswith(f"{k['image']}\t")
