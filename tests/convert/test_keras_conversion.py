"""``bdprune convert``: Keras .h5 -> ONNX -> PyTorch, checked against Keras, through the real CLI."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file

import bdpruning
from bdpruning import DeepID, load_model, save_model_dir
from bdpruning.runtime.atomic import atomic_dir
from bdpruning.cli import main
from bdpruning.pruning.compaction import compact_model
from bdpruning.numerics import roundoff
from helpers.conditions import need_shared
from helpers.data import noisy_faces, write_h5_set
from helpers.material import CLEAN_IMAGE, POISONED_IMAGE, PRUNED_2PCT_CHANNELS, ROOT, SHARED

pytestmark = pytest.mark.tensorflow
MODELS = SHARED / "models"


def _keras():
    """Keras, imported the safe way (torch and torchvision before TensorFlow)."""
    if importlib.util.find_spec("tf2onnx") is None:  # importorskip would import TensorFlow first
        pytest.skip("needs the [convert] extra")
    from bdpruning.convert import keras_to_onnx

    return keras_to_onnx.keras


def _convert(model: Path, out: Path, *options: str) -> int:
    return main(["convert", str(model), "--out", str(out), *options])


def _report(out: Path) -> dict:
    return json.loads((out / "conversion.json").read_text())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert each model once per module (TensorFlow start-up and tracing take seconds)."""
    done: dict[Path, Path] = {}

    def convert(model: Path) -> Path:
        _keras()
        if model not in done:
            out = tmp_path_factory.mktemp("converted") / model.stem
            assert _convert(model, out, "--images", str(CLEAN_IMAGE), str(POISONED_IMAGE)) == 0
            done[model] = out
        return done[model]

    return convert


def _small_cnn(path: Path, pooling: str = "flatten") -> Path:
    """A non-DeepID Keras CNN built from standard layers, saved as a Keras 3 .h5."""
    keras = _keras()
    layers = keras.layers
    keras.utils.set_random_seed(1)
    inputs = keras.Input((20, 16, 3), name="input")
    x = layers.Conv2D(6, 3, activation="relu", name="conv_a")(inputs)
    x = layers.MaxPooling2D(2, name="pool_a")(x)
    x = layers.Flatten(name="flat")(x) if pooling == "flatten" else layers.GlobalMaxPooling2D(name="gmp")(x)
    x = layers.Dense(12, activation="relu", name="dense_a")(x)
    outputs = layers.Dense(5, activation="softmax", name="dense_b")(x)
    keras.Model(inputs, outputs, name="small").save(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("module", ["bdpruning.convert.keras_to_onnx", "bdpruning.convert.keras_deepid",
                                    "bdpruning.demo.train"])
def test_keras_side_import_keeps_torchvision_importable(module):
    code = f"import {module}; import torchvision; import onnx2torch"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_weights_file_converts_and_every_backend_is_within_round_off(bd_weights, face_images, converted):
    out = converted(bd_weights)
    report = _report(out)
    assert report["passed"] and report["failures"] == []
    assert report["architecture"] == "deepid" and report["num_classes"] == 1283
    assert report["samples"] == 2 and report["inputs"]["images"] == [str(CLEAN_IMAGE), str(POISONED_IMAGE)]
    assert report["inputs"]["kind"] == "real"  # real images count; random ones are only a fallback
    assert set(report["backends"]) == {"keras", "onnxruntime", "onnx2torch", "deepid"}
    assert all(b["explained_by_round_off"] and b["safe_top1_agreement"] == 1.0 for b in report["backends"].values())
    assert report["reference"]["accumulation_depth"] > 1900  # the fan-ins of DeepID's deepest path
    assert report["max_abs_diff"] == max(report["backends"][b]["max_abs_diff_vs_keras"] for b in ("onnx2torch", "deepid"))
    assert report["opset"] == 17 and report["tolerance"] is None
    assert set(report["versions"]) == {"torch", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "onnx2torch"}

    model = load_model(out, device="cpu")
    from_onnx = load_model(out / "model.onnx", device="cpu")
    assert isinstance(model, DeepID)
    with torch.inference_mode():
        probs, onnx_probs = model(face_images), from_onnx(face_images)
    assert probs.argmax(1).tolist() == [860, 0] and onnx_probs.argmax(1).tolist() == [860, 0]
    reference = roundoff.float64_reference(model, face_images.numpy())
    assert roundoff.measure(reference, onnx_probs.numpy()).explained_by_round_off


@pytest.mark.parametrize("name", sorted(p.name for p in MODELS.glob("*.h5")) or ["(none)"])
def test_every_real_deepid_converts_on_real_and_random_images(name, tmp_path, capsys):
    """All of ../shared/models, the ill-conditioned contest net included: exit 0 on real images
    and on the random fallback, each backend within round-off of the float64 reference."""
    source = need_shared(MODELS / name)
    for kind, options in (("real", ["--images", str(CLEAN_IMAGE), str(POISONED_IMAGE)]), ("random", [])):
        out = tmp_path / kind
        assert _convert(source, out, *options) == 0, capsys.readouterr().err
        report = _report(out)
        assert report["inputs"]["kind"] == kind and report["passed"]
        for backend in report["backends"].values():
            assert backend["logit_error_units"] <= backend["logit_bound_units"]
            assert backend["softmax_bound_ratio"] <= 1 and backend["safe_top1_agreement"] == 1.0
    assert "round-off bound" in capsys.readouterr().out


def _wrong_onnx(onnx_bytes: bytes, hidden: int, target: int, delta: float) -> bytes:
    """The ONNX graph with one weight of the output layer (hidden unit -> class) off by ``delta``."""
    from onnx import numpy_helper

    proto = onnx.load_from_string(onnx_bytes)
    for index, initializer in enumerate(proto.graph.initializer):
        array = numpy_helper.to_array(initializer)
        if "output" in initializer.name and array.ndim == 2:
            array = array.copy()
            array[hidden, target] += delta
            proto.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, initializer.name))
            return proto.SerializeToString()
    raise AssertionError("no output kernel in the graph")


def test_parity_fails_a_conversion_with_one_weight_off_by_1e3(bd_weights, face_images):
    """Forced, not left to round-off: the output weight from the face's most active hidden unit
    to its top-1 class moves that logit by 1e-3 * activation, far beyond the bound."""
    from bdpruning.convert.keras_to_onnx import load_keras, to_onnx
    from bdpruning.workflows.convert import check_parity
    from bdpruning.models.keras_h5 import deepid_from_keras
    from bdpruning.models.onnx_graph import onnx_to_torch

    keras_model = load_keras(bd_weights)
    deepid = deepid_from_keras(bd_weights)
    onnx_bytes = to_onnx(keras_model, bd_weights).SerializeToString()
    images = face_images.numpy()
    with torch.inference_mode():
        hidden = _hidden_activations(deepid, face_images)[0]
    unit, target = int(hidden.argmax()), 860
    reference = roundoff.float64_reference(deepid, images)
    assert hidden[unit] * 1e-3 > 10 * reference.logit_bound[0] * 2  # the shift dwarfs the bound

    right = check_parity(keras_model, onnx_bytes, onnx_to_torch(onnx.load_from_string(onnx_bytes), "x"), deepid, images)
    assert right["passed"], right["failures"]
    wrong_bytes = _wrong_onnx(onnx_bytes, unit, target, 1e-3)
    wrong = check_parity(keras_model, wrong_bytes, onnx_to_torch(onnx.load_from_string(wrong_bytes), "x"), deepid, images)
    assert not wrong["passed"]
    assert not wrong["backends"]["onnxruntime"]["explained_by_round_off"]
    assert not wrong["backends"]["onnx2torch"]["explained_by_round_off"]
    assert wrong["backends"]["keras"]["explained_by_round_off"] and wrong["backends"]["deepid"]["explained_by_round_off"]
    assert any("onnx2torch's logits differ" in failure for failure in wrong["failures"])


def _hidden_activations(deepid: DeepID, images: torch.Tensor) -> torch.Tensor:
    """DeepID's 160 hidden units (the output layer's input) for each image."""
    captured = []
    handle = deepid.output.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
    try:
        deepid(images)
    finally:
        handle.remove()
    return captured[0]


def test_onnx_graph_takes_nchw_input_with_dynamic_batch(bd_weights, converted):
    graph = onnx.load(str(converted(bd_weights) / "model.onnx")).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert graph.input[0].name == "input" and graph.output[0].name == "output"
    assert not dims[0].dim_value and [d.dim_value for d in dims[1:]] == [3, 55, 47]
    assert not [node for node in graph.node if node.op_type == "Transpose"]


def test_a_converted_full_model_keeps_its_45_zeroed_channels(pruned_full, converted):
    out = converted(pruned_full)
    assert _report(out)["passed"]
    weights = load_file(str(out / "model.safetensors"))
    zero = (weights["conv_3.weight"].flatten(1) == 0).all(1) & (weights["conv_3.bias"] == 0)
    assert zero.nonzero().flatten().tolist() == PRUNED_2PCT_CHANNELS
    graph_module = load_model(out / "model.onnx", device="cpu")
    assert not isinstance(graph_module, DeepID)
    assert bdpruning.zeroed_channels(graph_module, "conv_3") == PRUNED_2PCT_CHANNELS


def test_tf2onnx_graph_compacts_exactly_and_reloads(pruned_full, converted, face_images, tmp_path):
    """The onnx2torch module of tf2onnx's graph (MatMul with constant matrices, not nn.Linear)."""
    zeroed, compact = (load_model(converted(pruned_full) / "model.onnx", device="cpu") for _ in range(2))
    groups = compact_model(compact)
    assert [m.role for m in groups[0].members] == ["source", "conv input", "matmul input"]
    images = torch.from_numpy(noisy_faces(face_images, 32)).float()
    with torch.no_grad():  # in float64, where removing zero terms changes nothing beyond 1e-12
        expected, actual = zeroed.double()(images.double()), compact.double()(images.double())
    assert (expected - actual).abs().max() <= 1e-12
    compact.float()
    with atomic_dir(tmp_path / "compact") as directory:
        save_model_dir(compact, directory)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "compact", device="cpu")(images), compact(images))


def test_keras3_saved_deepid_converts_and_force_replaces(tmp_path, capsys):
    _keras().utils.set_random_seed(0)
    from bdpruning.convert.keras_deepid import build_keras_deepid

    source = tmp_path / "bd_net.h5"
    build_keras_deepid(10).save(source)
    out = tmp_path / "out"
    assert _convert(source, out, "--samples", "64") == 0
    report = _report(out)
    assert report["passed"] and report["architecture"] == "deepid" and report["num_classes"] == 10
    assert load_model(out, device="cpu").num_classes == 10

    assert _convert(source, out) == 2  # exists, no --force: refused, left as it was
    assert "output directory exists" in capsys.readouterr().err
    assert _report(out) == report

    # a wrong conversion: a full model with DeepID's weights but a linear output layer; bdpruning's
    # DeepID assumes softmax, Keras returns logits. Exit 1, said on stderr, files kept to inspect
    model = keras_model_with_linear_output(source)
    model.save(tmp_path / "linear.h5")
    assert _convert(tmp_path / "linear.h5", out, "--force", "--samples", "8") == 1
    assert "parity check FAILED" in capsys.readouterr().err
    report = _report(out)
    assert not report["passed"] and report["samples"] == 8
    assert not report["backends"]["keras"]["explained_by_round_off"]
    assert (out / "model.safetensors").exists() and (out / "model.onnx").exists()


def keras_model_with_linear_output(source: Path):
    """The Keras model of ``source`` with its output layer's softmax taken away."""
    model = _keras().models.load_model(source, compile=False)
    model.get_layer("output").activation = _keras().activations.linear
    return model


def test_small_cnn_converts_through_onnx2torch(tmp_path):
    source = _small_cnn(tmp_path / "small.h5")
    data = np.random.default_rng(0).integers(0, 256, (40, 3, 20, 16), dtype=np.uint8)
    data_file = write_h5_set(tmp_path / "valid.h5", data, np.arange(40) % 5)
    out = tmp_path / "out"
    assert _convert(source, out, "--data", str(data_file), "--samples", "30") == 0
    report = _report(out)
    assert report["passed"] and report["architecture"] == "onnx" and report["samples"] == 30
    assert set(report["backends"]) == {"keras", "onnxruntime", "onnx2torch"}

    model = load_model(out, device="cpu")
    name, conv = bdpruning.find_layer(model, "conv_a")
    assert isinstance(conv, torch.nn.Conv2d) and conv.out_channels == 6, name
    images = torch.from_numpy(data[:8]).float()
    with torch.inference_mode():
        torch.testing.assert_close(load_model(out / "model.onnx", device="cpu")(images), model(images))
        torch.testing.assert_close(load_model(source, device="cpu")(images), model(images))


def _dense_only(path: Path) -> Path:
    keras = _keras()
    inputs = keras.Input((8,), name="input")
    keras.Model(inputs, keras.layers.Dense(3, name="dense")(inputs)).save(path)
    return path


def _junk(path: Path) -> Path:
    path.write_text("not a model")
    return path


def _lambda_file(source: Path, path: Path, class_name: str) -> Path:
    path.write_bytes(source.read_bytes())
    with h5py.File(path, "r+") as handle:
        config = handle.attrs["model_config"]
        config = config.decode() if isinstance(config, bytes) else config
        handle.attrs["model_config"] = config.replace('"class_name": "Flatten"', f'"class_name": "{class_name}"', 1)
    return path


def _misfit_weights(source: Path, path: Path) -> Path:
    path.write_bytes(source.read_bytes())
    with h5py.File(path, "r+") as handle:
        del handle["conv_2"]["conv_2"]["kernel:0"]
        handle["conv_2"]["conv_2"]["kernel:0"] = np.zeros((3, 3, 20, 41), np.float32)
    return path


BAD_INPUTS = {
    "missing": (lambda tmp, bd, full: tmp / "missing.h5", "missing.h5: no such file"),
    "not_hdf5": (lambda tmp, bd, full: _junk(tmp / "junk.h5"), "junk.h5: not an HDF5 file"),
    "no_layers": (lambda tmp, bd, full: write_h5_set(tmp / "data.h5", np.zeros((1, 3, 55, 47)), np.zeros(1)),
                  "data.h5: HDF5 file without Keras layers"),
    "lambda": (lambda tmp, bd, full: _lambda_file(full, tmp / "lambda.h5", "Lambda"),
               "lambda.h5: layer 'flatten_1' is a Keras Lambda layer"),
    "custom": (lambda tmp, bd, full: _lambda_file(full, tmp / "custom.h5", "MyFlatten"),
               "custom.h5: layer 'flatten_1' has class 'MyFlatten', which is not a built-in Keras layer"),
    "misfit": (lambda tmp, bd, full: _misfit_weights(bd, tmp / "misfit.h5"),
               "misfit.h5: weights do not fit the DeepID architecture: layer 'conv_2'"),
    "not_images": (lambda tmp, bd, full: _dense_only(tmp / "dense.h5"),
                   "dense.h5: expected a model with one image input of fixed size (N, H, W, C) and one output; "
                   "it takes [(None, 8)]"),
    "unconvertible": (lambda tmp, bd, full: _small_cnn(tmp / "gmp.h5", pooling="global_max"),
                      "gmp.h5: layer(s) gmp cannot be converted to PyTorch (unsupported operator(s): GlobalMaxPool)"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_model_files_end_in_one_line_and_leave_nothing(case, tmp_path, bd_weights, pruned_full):
    """As a user sees it: a fresh ``bdprune`` process prints exactly one line on stderr (no
    TensorFlow start-up messages, even where TensorFlow had to be loaded) and writes nothing."""
    make, message = BAD_INPUTS[case]
    source = make(tmp_path, bd_weights, pruned_full)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "bdpruning.cli", "convert", str(source), "--out", str(out)],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("bdprune convert: error: ") and message in result.stderr
    assert result.stdout == ""
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_data_that_does_not_fit_the_model_is_refused(bd_weights, tmp_path, capsys):
    data = write_h5_set(tmp_path / "valid.h5", np.zeros((4, 3, 50, 47), np.uint8), np.zeros(4))
    out = tmp_path / "out"
    assert _convert(bd_weights, out, "--data", str(data)) == 2
    assert "valid.h5: images have shape (3, 50, 47), the model expects (3, 55, 47)" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
