"""GoodNet on the real Lab-3 nets: the rule, the refusal of mismatched pairs, ONNX, classify."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bdpruning import BdpruningError, load_model, save_model_dir
from bdpruning.runtime.atomic import atomic_dir
from bdpruning.evaluation.goodnet import GoodNet, export_goodnet_onnx
from bdpruning.models.onnx_graph import export_onnx
from helpers.cli import bdprune
from helpers.data import safe_noisy_faces
from helpers.material import BD_WEIGHTS, CLEAN_IMAGE, N, POISONED_IMAGE, PRUNED_FULL
from helpers.reference import rule

def test_goodnet_keeps_the_documented_labels(nets, face_images):
    goodnet = GoodNet(*nets)
    labels = goodnet(face_images)
    assert labels.dtype == torch.int64 and labels.tolist() == [860, 0]
    bd_probs, repaired_probs = goodnet.outputs(face_images)
    assert bd_probs.shape == repaired_probs.shape == (2, N)
    torch.testing.assert_close(bd_probs.sum(1), torch.ones(2))


def test_goodnet_follows_the_rule_where_the_nets_disagree(nets, face_images):
    images = torch.from_numpy(safe_noisy_faces(face_images, 24, list(nets))[0]).float()
    expected = rule(*nets, images)
    assert 0 < expected.count(N) < len(expected)  # the set really splits B and B'
    assert GoodNet(*nets)(images).tolist() == expected


def test_a_disagreeing_repair_flags_with_label_n(nets, always_7, face_images):
    assert GoodNet(nets[0], always_7)(face_images).tolist() == [N, N]


def _onnx_model(path: Path, num_classes: int, shape: tuple[int, int, int]) -> Path:
    model = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), num_classes), nn.Softmax(dim=1))
    export_onnx(model, path, shape)
    return path


def test_mismatched_nets_are_refused_naming_both_files(nets, tmp_path):
    bd, _ = nets
    ten = _onnx_model(tmp_path / "ten_classes.onnx", 10, (3, 55, 47))
    with pytest.raises(BdpruningError, match=rf"{BD_WEIGHTS} has classes 1283, {ten} has classes 10"):
        GoodNet(bd, load_model(ten, device="cpu"))
    small = _onnx_model(tmp_path / "small.onnx", N, (3, 32, 32))
    with pytest.raises(BdpruningError, match=r"has input shape \(3, 55, 47\), .*small.onnx has input shape"):
        GoodNet(bd, load_model(small, device="cpu"))


def test_onnx_export_gives_the_module_labels(nets, face_images, tmp_path):
    import onnxruntime

    goodnet = GoodNet(*nets)
    export_goodnet_onnx(goodnet, tmp_path / "goodnet.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "goodnet.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    images = torch.from_numpy(safe_noisy_faces(face_images, 24, list(nets))[0]).float()
    with torch.no_grad():
        expected = goodnet(images)
    assert N in expected.tolist()
    (labels,) = session.run(None, {"input": images.numpy()})
    assert labels.dtype == np.int64 and labels.tolist() == expected.tolist()
    (one,) = session.run(None, {"input": images[:1].numpy()})  # dynamic batch
    assert one.tolist() == [860]


def test_classify_prints_a_label_per_image(nets, always_7, tmp_path, capsys):
    models = ["--bd", BD_WEIGHTS, "--repaired", PRUNED_FULL]
    code, out, err = bdprune(capsys, "classify", CLEAN_IMAGE, POISONED_IMAGE, *models)
    assert code == 0, err
    assert out.splitlines() == [f"{CLEAN_IMAGE}\t860", f"{POISONED_IMAGE}\t0"]

    with atomic_dir(tmp_path / "always_7") as directory:
        save_model_dir(always_7, directory)
    code, out, _ = bdprune(capsys, "classify", CLEAN_IMAGE, "--bd", BD_WEIGHTS, "--repaired", tmp_path / "always_7")
    assert code == 0 and out == f"{CLEAN_IMAGE}\t{N}\tflagged as poisoned (B: 860, B': 7)\n"


def test_classify_bad_input_is_one_line_exit_2(nets, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.open(CLEAN_IMAGE).resize((94, 110)).save(big)
    models = ["--bd", BD_WEIGHTS, "--repaired", PRUNED_FULL]
    code, out, err = bdprune(capsys, "classify", CLEAN_IMAGE, big, *models)
    assert (code, out) == (2, "") and err.count("\n") == 1 and f"{big}: image is 94x110" in err
    code, out, _ = bdprune(capsys, "classify", big, "--resize", *models)
    assert code == 0 and out.startswith(f"{big}\t")
    code, _, err = bdprune(capsys, "classify", tmp_path / "missing.png", *models)
    assert code == 2 and "missing.png: no such file" in err
    ten = _onnx_model(tmp_path / "ten.onnx", 10, (3, 55, 47))
    code, _, err = bdprune(capsys, "classify", CLEAN_IMAGE, "--bd", BD_WEIGHTS, "--repaired", ten)
    assert code == 2 and f"{BD_WEIGHTS} has classes 1283, {ten} has classes 10" in err


def test_verbose_shows_bdpruning_debug_messages_not_every_library_s(nets, tmp_path):
    """``-v`` used to flood stderr with onnx2torch's registry DEBUG lines (one per converter)."""
    import subprocess
    import sys

    repaired = _onnx_model(tmp_path / "repaired.onnx", N, (3, 55, 47))
    result = subprocess.run([sys.executable, "-m", "bdpruning.cli", "classify", "-v", str(CLEAN_IMAGE),
                             "--bd", str(BD_WEIGHTS), "--repaired", str(repaired)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    debug = [line for line in result.stderr.splitlines() if line.startswith("DEBUG")]
    assert all(line.startswith("DEBUG bdpruning") for line in debug), debug[:3]
