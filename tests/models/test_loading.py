"""The one loader, TensorFlow-free: DeepID from .h5, full models, layers by Keras name, model
directories, bad model files in one line."""

from __future__ import annotations


import h5py
import numpy as np
import pytest
import torch

import bdpruning
from bdpruning import BdpruningError, DeepID, load_model
from bdpruning.runtime.atomic import atomic_dir
from helpers.material import PRUNED_2PCT_CHANNELS


def test_deepid_from_weights_file_predicts_the_documented_labels(bd_weights, face_images):
    model = load_model(bd_weights, device="cpu")
    assert isinstance(model, DeepID) and model.num_classes == 1283
    probs = model(face_images)
    assert probs.argmax(1).tolist() == [860, 0]
    assert probs[0, 860].item() == pytest.approx(0.617, abs=1e-3)


def test_full_model_keeps_its_45_zeroed_channels(pruned_full):
    model = load_model(pruned_full, device="cpu")
    assert bdpruning.zeroed_channels(model, "conv_3") == PRUNED_2PCT_CHANNELS


def test_layers_are_found_by_keras_name_with_valid_names_listed(bd_weights):
    model = load_model(bd_weights, device="cpu")
    assert bdpruning.find_layer(model, "pool_3")[1] is model.pool_3
    with pytest.raises(BdpruningError, match="valid layer names: conv_1, pool_1"):
        bdpruning.find_layer(model, "conv_9")


def test_model_directory_round_trip_keeps_masks(bd_weights, face_images, tmp_path):
    model = load_model(bd_weights, device="cpu")
    bdpruning.prune_channels(model, "conv_3", [5, 7])
    with atomic_dir(tmp_path / "m") as directory:
        bdpruning.save_model_dir(model, directory)
    reloaded = load_model(tmp_path / "m", device="cpu")
    assert bdpruning.zeroed_channels(reloaded, "conv_3") == [5, 7]
    torch.testing.assert_close(reloaded(face_images), model(face_images), rtol=0, atol=0)
    # masks persist after reload: a weight update cannot revive a pruned channel
    with torch.no_grad():
        reloaded.conv_3.weight_orig.add_(1.0)
    assert bdpruning.zeroed_channels(reloaded, "conv_3") == [5, 7]


def test_bad_model_files_get_one_line_errors(tmp_path):
    with pytest.raises(BdpruningError, match="no such file"):
        load_model(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(BdpruningError, match="junk.h5: not an HDF5 file"):
        load_model(junk)
    empty = tmp_path / "empty.h5"
    h5py.File(empty, "w").close()
    with pytest.raises(BdpruningError, match="without Keras layers"):
        load_model(empty)


def test_weights_that_do_not_fit_deepid_are_refused(bd_weights, tmp_path):
    broken = tmp_path / "broken.h5"
    broken.write_bytes(bd_weights.read_bytes())
    with h5py.File(broken, "r+") as handle:
        del handle["conv_2"]["conv_2"]["kernel:0"]
        handle["conv_2"]["conv_2"]["kernel:0"] = np.zeros((3, 3, 20, 41), np.float32)
    with pytest.raises(BdpruningError, match=r"broken.h5: weights do not fit the DeepID.*conv_2"):
        load_model(broken)


def test_lambda_layers_are_refused_without_running_them(pruned_full, tmp_path):
    evil = tmp_path / "lambda.h5"
    evil.write_bytes(pruned_full.read_bytes())
    with h5py.File(evil, "r+") as handle:
        config = handle.attrs["model_config"]
        config = config.decode() if isinstance(config, bytes) else config
        handle.attrs["model_config"] = config.replace('"class_name": "Flatten"', '"class_name": "Lambda"', 1)
    with pytest.raises(BdpruningError, match="Lambda layer"):
        load_model(evil)


