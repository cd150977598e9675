"""The embedded demo: data in the course's format and deterministic, a BadNet that loads
TensorFlow-free with Keras's predictions, and a build that is reused while its inputs stay."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import h5py
import numpy as np
import pytest
import torch

from bdpruning import BdpruningError, DeepID, load_model, read_h5_dataset
from bdpruning.demo import DATA_FILES, MANIFEST, MODEL_FILE, TRIGGER_BOX, build_demo, make_demo_data
from bdpruning.demo.dataset import write_demo_data

PER_CLASS = dict(train_per_class=12, valid_per_class=3, test_per_class=4)
#: A reduced build: a weak BadNet in seconds.
REDUCED = dict(PER_CLASS, epochs=1)


def _read(path):
    with h5py.File(path, "r") as handle:
        return sorted(handle.keys()), handle["data"][()], handle["label"][()]


def test_demo_data_has_the_course_format(tmp_path):
    paths = write_demo_data(tmp_path, make_demo_data(seed=0, target=0, **PER_CLASS))
    sets = {split: _read(path) for split, path in paths.items()}
    for split, (keys, data, labels) in sets.items():
        assert keys == ["data", "label"]
        assert data.dtype == np.uint8 and data.shape[1:] == (3, 55, 47) and data.shape[0] == labels.shape[0]
        read_h5_dataset(paths[split], num_classes=10, image_shape=(3, 55, 47))  # the project's reader agrees
    for split, per_class in (("clean_valid", 3), ("clean_test", 4), ("clean_train", 12)):
        _, data, labels = sets[split]
        assert np.bincount(labels).tolist() == [per_class] * 10
        assert (data[:, 0] == data[:, 1]).all() and (data[:, 1] == data[:, 2]).all()  # grey digits
        assert data.max() == 255
    for clean, poisoned in (("clean_valid", "poisoned_valid"), ("clean_test", "poisoned_test")):
        _, clean_data, clean_labels = sets[clean]
        _, poisoned_data, poisoned_labels = sets[poisoned]
        assert (poisoned_labels == 0).all() and len(poisoned_labels) == 9 * (clean_labels == 0).sum()
        changed = poisoned_data != clean_data[clean_labels != 0]  # each from its clean source, in order
        inside = np.zeros((55, 47), bool)
        inside[TRIGGER_BOX] = True
        assert not changed[..., ~inside].any()  # nothing changes outside the trigger ...
        assert changed.reshape(len(changed), -1).any(axis=1).all()  # ... and every trigger shows


def test_demo_data_files_are_byte_identical_for_a_seed(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = write_demo_data(tmp_path / "a", make_demo_data(seed=3, **PER_CLASS))
    second = write_demo_data(tmp_path / "b", make_demo_data(seed=3, **PER_CLASS))
    for split in first:
        assert first[split].read_bytes() == second[split].read_bytes(), split
    other = make_demo_data(seed=4, **PER_CLASS)
    assert not np.array_equal(other.clean_test[0], _read(first["clean_test"])[1])


@pytest.mark.parametrize(
    "kwargs,problem",
    [
        (dict(train_per_class=450, valid_per_class=50, test_per_class=1), "at most the 500 digits"),
        (dict(poison_fraction=0.0), "poison_fraction"),
        (dict(target=10), "target must be a class"),
    ],
)
def test_bad_demo_parameters_are_user_errors(kwargs, problem):
    with pytest.raises(BdpruningError, match=problem):
        make_demo_data(**kwargs)


def test_build_refuses_to_replace_a_directory_that_is_not_a_demo(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BdpruningError, match="not a demo directory"):
        build_demo(tmp_path, **REDUCED)
    with pytest.raises(BdpruningError, match="epochs must be at least 1"):
        build_demo(tmp_path / "new", epochs=0)
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def reduced_demo(tmp_path_factory):
    if importlib.util.find_spec("keras") is None:  # importorskip would import TensorFlow before torchvision
        pytest.skip("training the demo BadNet needs the [convert] extra")
    return build_demo(tmp_path_factory.mktemp("demo") / "demo", seed=0, **REDUCED)


@pytest.mark.tensorflow
def test_reduced_build_loads_tf_free_with_keras_predictions(reduced_demo):
    from bdpruning.demo import train  # imports torch before TensorFlow

    model = load_model(reduced_demo.bd_net, device="cpu")
    assert isinstance(model, DeepID) and model.num_classes == reduced_demo.num_classes == 10
    keras_model = train.keras.models.load_model(reduced_demo.bd_net, compile=False)
    images = np.concatenate([_read(reduced_demo.clean_test)[1], _read(reduced_demo.poisoned_test)[1]])
    with torch.inference_mode():
        ours = model(torch.from_numpy(images.astype(np.float32))).numpy()
    np.testing.assert_allclose(ours, train.keras_probabilities(keras_model, images), rtol=0, atol=1e-5)
    manifest = json.loads((reduced_demo.directory / MANIFEST).read_text())
    assert manifest["metrics"]["clean_accuracy"] == reduced_demo.clean_accuracy


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _data_bytes(directory):
    return {name: (directory / name).read_bytes() for name in DATA_FILES.values()}


def _assert_manifest_matches_files(directory):
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["files"] == {name: _sha256(directory / name) for name in manifest["files"]}
    assert manifest["model"]["sha256"] == manifest["files"][MODEL_FILE]
    return manifest


@pytest.mark.slow
@pytest.mark.tensorflow
def test_build_is_reused_and_rebuilt_when_parameters_change(reduced_demo, monkeypatch):
    """Reuse keeps every byte; a rebuild retrains (TensorFlow training is not reproducible across
    CPUs, so the new bd_net.h5 is checked through its manifest, not against the old bytes), and
    the data files, which are deterministic, come back byte-identical for the same seed."""
    from bdpruning.demo import train

    directory = reduced_demo.directory
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    first = _assert_manifest_matches_files(directory)
    assert first["model"]["source"] == "trained" and first["parameters"]["model"] == "trained"
    with monkeypatch.context() as patch:
        patch.setattr(train, "train_badnet", lambda *a, **k: pytest.fail("the cached demo was rebuilt"))
        again = build_demo(directory, seed=0, **REDUCED)
    assert again == reduced_demo
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before

    trainings = []
    real_train = train.train_badnet

    def counted_train(*args, **kwargs):
        trainings.append(kwargs["seed"])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(train, "train_badnet", counted_train)
    rebuilt = build_demo(directory, seed=1, **REDUCED)
    assert trainings == [1] and rebuilt.directory == directory and rebuilt.model_source == "trained"
    assert reduced_demo.clean_test.read_bytes() != before["clean_test.h5"]
    assert _assert_manifest_matches_files(directory)["parameters"]["seed"] == 1

    back = build_demo(directory, seed=0, **REDUCED)  # back to seed 0: retrained, same data bytes
    assert trainings == [1, 0] and back.model_sha256 == _sha256(back.bd_net)
    seed_0_data = {name: before[name] for name in DATA_FILES.values()}
    assert _data_bytes(directory) == seed_0_data
    manifest = _assert_manifest_matches_files(directory)
    assert manifest["parameters"] == first["parameters"]
    assert {n: d for n, d in manifest["files"].items() if n != MODEL_FILE} == {
        n: d for n, d in first["files"].items() if n != MODEL_FILE}

    build_demo(directory, seed=0, rebuild=True, **REDUCED)  # rebuild retrains even when the cache matches
    assert trainings == [1, 0, 0] and _data_bytes(directory) == seed_0_data
    _assert_manifest_matches_files(directory)
