"""A Keras model's output contract is read from its graph: a final softmax means probabilities,
a Dense layer without activation logits (issue 18)."""

from __future__ import annotations

import importlib.util

import pytest
import torch  # noqa: F401 (torch before TensorFlow)

import bdpruning


@pytest.mark.tensorflow
@pytest.mark.slow
@pytest.mark.parametrize("activation, outputs", [("softmax", "probabilities"), (None, "logits")])
def test_a_keras_models_contract_comes_from_its_last_layer(tmp_path, activation, outputs):
    if importlib.util.find_spec("tf2onnx") is None:
        pytest.skip("needs the [convert] extra")
    from bdpruning.convert.tensorflow_runtime import keras

    layers = keras.layers
    inputs = keras.Input((8, 8, 3), name="input")
    x = layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    result = layers.Dense(3, activation=activation, name="dense")(layers.Flatten(name="flat")(x))
    path = tmp_path / "model.h5"
    keras.Model(inputs, result).save(path)
    model = bdpruning.load_model(path, "cpu")
    assert bdpruning.model_info(model).outputs == outputs
    assert bdpruning.model_info(model).input_range is None  # a Keras file does not say; nothing is assumed
    values = model(torch.rand(5, 3, 8, 8)).detach()
    assert torch.allclose(values.sum(dim=1), torch.ones(5), atol=1e-5) == (outputs == "probabilities")


def test_a_keras_3_archive_is_refused_in_one_line(tmp_path):
    import zipfile

    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "{}")
    with pytest.raises(bdpruning.BdpruningError, match=r"\.keras archive; bdpruning reads Keras \.h5 files"):
        bdpruning.load_model(path, "cpu")
