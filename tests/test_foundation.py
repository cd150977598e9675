"""The TensorFlow-free core: DeepID from .h5, the one loader, the data reader, model directories."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import bdpruning
from bdpruning import BdpruningError, DeepID, load_model, read_h5_dataset
from bdpruning.runtime.atomic import atomic_dir
from conftest import PRUNED_2PCT_CHANNELS, ROOT, write_h5_set


def test_deepid_from_weights_file_predicts_the_documented_labels(bd_weights, face_images):
    model = load_model(bd_weights, device="cpu")
    assert isinstance(model, DeepID) and model.num_classes == 1283
    probs = model(face_images)
    assert probs.argmax(1).tolist() == [860, 0]
    assert probs[0, 860].item() == pytest.approx(0.617, abs=1e-3)


def test_full_model_keeps_its_45_zeroed_channels(pruned_full):
    model = load_model(pruned_full, device="cpu")
    assert bdpruning.pruned_channels(model, "conv_3") == PRUNED_2PCT_CHANNELS


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
    assert bdpruning.pruned_channels(reloaded, "conv_3") == [5, 7]
    torch.testing.assert_close(reloaded(face_images), model(face_images), rtol=0, atol=0)
    # masks persist after reload: a weight update cannot revive a pruned channel
    with torch.no_grad():
        reloaded.conv_3.weight_orig.add_(1.0)
    assert bdpruning.pruned_channels(reloaded, "conv_3") == [5, 7]


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


@pytest.mark.parametrize(
    "data,labels,problem",
    [
        (np.zeros((4, 55, 47, 3), np.uint8), np.zeros(4), "channels-last"),
        (np.zeros((4, 3, 50, 47), np.uint8), np.zeros(4), "model expects"),
        (np.zeros((0, 3, 55, 47), np.uint8), np.zeros(0), "empty"),
        (np.zeros((4, 3, 55, 47), np.uint8), np.zeros(3), "'label' has shape"),
        (np.zeros((4, 3, 55, 47), np.uint8), np.array([0, 1, 2, 10]), "outside the model's 10 classes"),
        (np.zeros((4, 3, 55, 47), np.uint8), np.array([0, 1.5, 2, 3]), "non-integer"),
    ],
)
def test_bad_data_files_get_one_line_errors(tmp_path, data, labels, problem):
    path = write_h5_set(tmp_path / "set.h5", data, labels)
    with pytest.raises(BdpruningError, match=problem):
        read_h5_dataset(path, num_classes=10, image_shape=(3, 55, 47))


def test_data_missing_keys_are_named(tmp_path):
    path = tmp_path / "nolabel.h5"
    with h5py.File(path, "w") as handle:
        handle["data"] = np.zeros((2, 3, 55, 47), np.uint8)
    with pytest.raises(BdpruningError, match="nolabel.h5: missing dataset\\(s\\) 'label'"):
        read_h5_dataset(path)


def test_data_reader_streams_raw_pixels(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (7, 3, 55, 47), dtype=np.uint8)
    dataset = read_h5_dataset(write_h5_set(tmp_path / "s.h5", data, np.arange(7.0)))
    images = torch.cat([b for b, _ in dataset.batches(3)])
    assert images.dtype == torch.float32 and images.max() > 200  # raw 0..255, not scaled
    np.testing.assert_array_equal(images.numpy(), data)
    items = dataset.__getitems__([5, 1, 3])
    np.testing.assert_array_equal(torch.stack([x for x, _ in items]).numpy(), data[[5, 1, 3]])
    assert [int(y) for _, y in items] == [5, 1, 3]


def test_cli_reports_user_errors_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bdpruning.cli", "nonsense"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2 and "unknown command 'nonsense'" in result.stderr


def test_installed_names_live_under_bdpruning():
    import bdpruning.convert
    import bdpruning.lightning_modules

    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('convert') is not None)"
    assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0


def test_every_public_name_is_documented():
    """The API reference is the docstrings: each public name says what it takes and returns."""
    import inspect

    import bdpruning

    undocumented = [name for name in bdpruning.__all__ if len(inspect.getdoc(getattr(bdpruning, name)) or "") < 20]
    assert undocumented == []
