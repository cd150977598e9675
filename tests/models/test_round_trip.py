"""Issue 18's scenario: a researcher's own BadNet (a small ResNet with BatchNorm and shortcuts,
logits out, [0, 1] inputs) goes through adopt, the sweep and saving, back into its own class,
through fine-pruning, out as ONNX at several opsets and through the CLI, with no glue."""

from __future__ import annotations

import copy
import io
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import bdpruning
from bdpruning import BdpruningError, adopt, load_model, save_model_dir
from bdpruning.cli import main
from bdpruning.pruning.masks import masked_channels, plain_state_dict


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()  # identity
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """A researcher's ResNet: BatchNorm, an identity and a projection shortcut, logits out."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.layer1, self.layer2 = BasicBlock(8, 8), BasicBlock(8, 12, 2)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(self.pool(x).flatten(1))


TARGET = 1
LAYER, RANK_LAYER = "layer2.conv1", "layer2.bn1"


def quadrants(count: int, seed: int, trigger: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[0, 1] images with one bright quadrant (the label); with ``trigger`` a white corner and
    every label the attacker's target."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 4
    images = torch.rand(count, 3, 12, 12, generator=generator) * 0.3
    for image, quadrant in zip(images, labels.tolist()):
        row, col = divmod(quadrant, 2)
        image[:, row * 6:(row + 1) * 6, col * 6:(col + 1) * 6] += 0.6
    if trigger:
        images[:, :, -3:, -3:] = 1.0
        labels = torch.full((count,), TARGET)
    return images, labels


def write_h5(path, images: torch.Tensor, labels: torch.Tensor):
    import h5py

    with h5py.File(path, "w") as handle:
        handle["data"] = images.numpy()
        handle["label"] = labels.numpy()
    return path


@pytest.fixture(scope="module")
def badnet() -> TinyResNet:
    """Trained in seconds: clean accuracy and ASR near 100 %."""
    torch.manual_seed(0)
    clean, poisoned = quadrants(256, 0), quadrants(64, 1, trigger=True)
    images, labels = torch.cat([clean[0], poisoned[0]]), torch.cat([clean[1], poisoned[1]])
    model = TinyResNet()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(4):
        order = torch.randperm(len(images))
        for start in range(0, len(order), 32):
            batch = order[start:start + 32]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(clean[0]).argmax(1) == clean[1]).float().mean()
    assert accuracy > 0.9, f"the test BadNet did not learn ({accuracy:.2%})"
    return model


@pytest.fixture
def adopted(badnet) -> TinyResNet:
    model = copy.deepcopy(badnet).eval()
    return adopt(model, outputs="logits", example=quadrants(2, 9)[0])


def test_adopt_sweep_save_reload_into_own_class_and_fine_prune_as_in_memory(adopted, tmp_path):
    from bdpruning.lightning_modules.finetune import finetune_model

    clean, poisoned = quadrants(200, 2), quadrants(100, 3, trigger=True)
    result = bdpruning.run_sweep(adopted, clean, poisoned, layer=LAYER, rank_layer=RANK_LAYER, thresholds=(2.0,),
                                 full_sweep=True)
    channels = result.ranking.order[:len(result.ranking.order) // 2]
    repaired = bdpruning.prune_channels(copy.deepcopy(adopted), LAYER, channels)
    assert bdpruning.model_info(repaired).input_range == "0..1"

    directory = save_model_dir(repaired, tmp_path / "new" / "b_prime")  # parents are created
    record = json.loads((directory / "model.json").read_text())
    assert record["outputs"] == "logits" and record["input_range"] == "0..1" and record["removed"] == []
    assert record["pruned"] == {LAYER: sorted(channels)}

    reloaded = load_model(directory, "cpu", into=TinyResNet())
    assert type(reloaded) is TinyResNet and isinstance(reloaded.layer2.bn1, nn.BatchNorm2d)
    assert plain_state_dict(reloaded).keys() == plain_state_dict(repaired).keys()
    assert masked_channels(reloaded) == masked_channels(repaired)
    assert bdpruning.model_info(reloaded).outputs == "logits"
    images = clean[0][:32]
    with torch.no_grad():
        assert torch.equal(reloaded(images), repaired(images))
    assert bdpruning.pruned_channels(reloaded, LAYER) == sorted(channels)

    tuned = [finetune_model(model, clean, 2, poisoned_eval=poisoned, seed=3, batch_size=32, accelerator="cpu",
                            progress=False) for model in (repaired, reloaded)]
    in_memory, after_reload = (plain_state_dict(result.model) for result in tuned)
    assert all(torch.equal(in_memory[key], after_reload[key]) for key in in_memory)
    assert tuned[0].history == tuned[1].history
    assert tuned[1].after["train_loss"] > 0  # cross-entropy on logits


def test_compaction_is_recorded_and_replayed_into_the_class(adopted, tmp_path):
    bdpruning.prune_channels(adopted, LAYER, [0, 3, 5])
    images = quadrants(16, 4)[0]
    with torch.no_grad():
        expected = adopted(images)
    bdpruning.compact_model(adopted)
    directory = save_model_dir(adopted, tmp_path / "compact")
    record = json.loads((directory / "model.json").read_text())
    assert record["removed"] == [{"layer": LAYER, "channels": [0, 3, 5]}]
    reloaded = load_model(directory, "cpu", into=TinyResNet())
    assert reloaded.layer2.conv1.out_channels == 12 - 3
    with torch.no_grad():
        assert torch.allclose(reloaded(images), expected, atol=1e-5)  # compaction itself is checked elsewhere
        assert torch.equal(reloaded(images), adopted(images))
    graph = load_model(directory, "cpu")  # without the class: its ONNX
    assert bdpruning.model_info(graph).outputs == "logits"


def test_save_model_dir_refuses_an_existing_directory_and_follows_the_umask(adopted, tmp_path):
    import os

    directory = save_model_dir(adopted, tmp_path / "m")
    with pytest.raises(BdpruningError, match="exists"):
        save_model_dir(adopted, directory)
    save_model_dir(adopted, directory, force=True)
    umask = os.umask(0o022)
    os.umask(umask)
    assert directory.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (directory / "model.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_layer_names_leave_out_the_identity_shortcut(badnet):
    names = bdpruning.layer_names(badnet)
    assert "layer1.shortcut" not in names and "layer2.shortcut.0" in names and "layer2.bn1" in names


def test_data_outside_the_models_input_range_is_refused_in_one_line(adopted):
    images, labels = quadrants(64, 5)
    with pytest.raises(BdpruningError) as error:
        bdpruning.run_sweep(adopted, (images * 255, labels), layer=LAYER, rank_layer=RANK_LAYER)
    message = str(error.value)
    assert "\n" not in message and "the model takes 0..1" in message and "divide the images by 255" in message


def _export(model: nn.Module, opset: int, dynamo: bool) -> bytes:
    buffer = io.BytesIO()
    example = torch.zeros(1, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (example,), buffer, dynamo=True, opset_version=opset,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        else:
            torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    return buffer.getvalue()


NEWEST_OPSET = 23  # the newest torch.onnx.export (dynamo=False) writes with torch 2.14


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("opset", [17, 18, 20, NEWEST_OPSET])
def test_an_onnx_export_at_any_opset_loads_with_its_contract(badnet, tmp_path, opset, dynamo):
    if dynamo:
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    path = tmp_path / "net.onnx"
    path.write_bytes(_export(badnet, opset, dynamo))
    assert onnx.load(str(path)).opset_import[0].version >= opset
    model = load_model(path, "cpu")
    assert bdpruning.model_info(model).outputs == "logits"
    images = quadrants(8, 6)[0]
    with torch.no_grad():
        expected, actual = badnet(images), model(images)
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()


class Softmaxed(nn.Module):
    def __init__(self, net: nn.Module, final: nn.Module) -> None:
        super().__init__()
        self.net, self.final = net, final

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.net(x))


def test_the_output_contract_is_read_from_the_graph_and_can_be_overridden(badnet, tmp_path):
    softmax, log_softmax = tmp_path / "softmax.onnx", tmp_path / "log_softmax.onnx"
    # eval(): the exporter restores the wrapper's mode afterwards, and badnet is its child
    softmax.write_bytes(_export(Softmaxed(badnet, nn.Softmax(dim=1)).eval(), 17, False))
    log_softmax.write_bytes(_export(Softmaxed(badnet, nn.LogSoftmax(dim=1)).eval(), 17, False))
    assert bdpruning.model_info(load_model(softmax, "cpu")).outputs == "probabilities"
    with pytest.raises(BdpruningError) as error:
        load_model(log_softmax, "cpu")
    assert "ends in LogSoftmax" in str(error.value) and "--outputs" in str(error.value)
    assert "\n" not in str(error.value)
    assert bdpruning.model_info(load_model(softmax, "cpu", outputs="logits")).outputs == "logits"


def test_training_checks_the_contract_on_its_first_batch(badnet):
    from bdpruning.lightning_modules.finetune import finetune_model

    wrong = adopt(Softmaxed(copy.deepcopy(badnet), nn.Softmax(dim=1)), outputs="logits",
                  example=quadrants(2, 9)[0])
    bdpruning.prune_channels(wrong, "net." + LAYER, [0])
    with pytest.raises(BdpruningError, match="recorded as returning logits, but .* probabilities"):
        finetune_model(wrong, quadrants(32, 7), 1, accelerator="cpu", progress=False)


def test_a_baseline_at_chance_level_is_refused_naming_the_causes():
    from bdpruning.evaluation.chance import check_not_chance

    with pytest.raises(BdpruningError) as error:
        check_not_chance(96, 1000, 10)  # 9.60 % of 10 classes
    assert "chance level" in str(error.value) and "input scale" in str(error.value)
    assert "channel order" in str(error.value) and "labels" in str(error.value)
    check_not_chance(200, 1000, 10)  # 20 %: far above chance
    check_not_chance(50, 11547, 1283)  # DeepID's 1283 classes: 0.43 % is above 0.08 %


@pytest.mark.slow
def test_cli_prunes_and_fine_tunes_a_torch_onnx_export(badnet, tmp_path, capsys):
    """``torch.onnx.export`` at PyTorch's default opset, then ``bdprune prune`` and ``finetune``:
    the loss is cross-entropy on logits (positive) and fine-tuning raises the clean accuracy."""
    path = tmp_path / "badnet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(badnet, (torch.zeros(1, 3, 12, 12),), str(path), dynamo=False,
                          input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    clean = write_h5(tmp_path / "clean.h5", *quadrants(300, 2))
    poisoned = write_h5(tmp_path / "poisoned.h5", *quadrants(100, 3, trigger=True))
    code = main(["prune", "--model", str(path), "--clean-valid", str(clean), "--poisoned-valid", str(poisoned),
                 "--layer", "conv1/Conv", "--rank-layer", "Relu", "--thresholds", "2", "10",
                 "--out", str(tmp_path / "pruned"), "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    repaired = sorted((tmp_path / "pruned").glob("repaired_*"))[-1]
    assert json.loads((repaired / "model.json").read_text())["outputs"] == "logits"
    code = main(["finetune", "--model", str(repaired), "--clean-valid", str(clean), "--poisoned-valid",
                 str(poisoned), "--epochs", "3", "--lr", "0.01", "--accelerator", "cpu", "--out",
                 str(tmp_path / "tuned")])
    assert code == 0
    history = json.loads((tmp_path / "tuned" / "finetune.json").read_text())["history"]
    assert all(row["train_loss"] > 0 for row in history[1:])
    assert history[-1]["clean_accuracy"] >= history[0]["clean_accuracy"]
    tuned = load_model(tmp_path / "tuned", "cpu")
    assert bdpruning.model_info(tuned).outputs == "logits"


@pytest.mark.slow
def test_cli_fine_tunes_a_saved_adopted_model_through_its_onnx_keeping_its_masks(adopted, tmp_path):
    bdpruning.prune_channels(adopted, LAYER, [1, 2, 4])
    directory = save_model_dir(adopted, tmp_path / "b_prime")
    graph = load_model(directory, "cpu")
    assert masked_channels(graph) == {"layer2/conv1/Conv": [1, 2, 4]}
    clean = write_h5(tmp_path / "clean.h5", *quadrants(128, 2))
    assert main(["finetune", "--model", str(directory), "--clean-valid", str(clean), "--epochs", "1",
                 "--accelerator", "cpu", "--out", str(tmp_path / "tuned")]) == 0
    tuned = load_model(tmp_path / "tuned", "cpu")
    assert bdpruning.pruned_channels(tuned, "layer2/conv1/Conv") == [1, 2, 4]
    assert np.isfinite(json.loads((tmp_path / "tuned" / "finetune.json").read_text())["after"]["train_loss"])


def test_masks_that_keep_their_shift_survive_a_reload_without_the_class(adopted, tmp_path):
    """ANP and RNP prune a channel and keep its BatchNorm shift: the exported graph folds that
    shift into the conv's bias, which the reloaded graph's mask must keep."""
    bdpruning.prune_channels(adopted, LAYER, [2, 6], keep_shift=True)
    directory = save_model_dir(adopted, tmp_path / "anp_like")
    graph = load_model(directory, "cpu")
    images = quadrants(16, 8)[0]
    with torch.no_grad():
        expected, actual = adopted(images), graph(images)
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert masked_channels(load_model(directory, "cpu", into=TinyResNet())) == {LAYER: [2, 6]}


def test_cli_prune_refuses_data_that_does_not_fit_the_model_in_one_line(badnet, tmp_path, capsys):
    """Labels from another numbering give a baseline at chance level, which stops the run; the
    issue's 0..255 files given to a [0, 1] model are refused before the sweep once the range is
    said (an ONNX file does not hold it)."""
    path = tmp_path / "badnet.onnx"
    path.write_bytes(_export(badnet, 17, False))
    images, labels = quadrants(200, 2)
    shifted = write_h5(tmp_path / "shifted.h5", images, (labels + 1) % 4)
    raw = write_h5(tmp_path / "raw.h5", (images * 255).round(), labels)
    run = ["prune", "--model", str(path), "--layer", "conv1/Conv", "--rank-layer", "Relu", "--out",
           str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    assert main([*run, "--clean-valid", str(shifted)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chance level" in err and "input scale" in err and "labels" in err
    assert main([*run, "--clean-valid", str(raw), "--input-range", "0..1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the model takes 0..1: divide the images by 255" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_every_cli_stage_runs_on_saved_adopted_models(adopted, tmp_path, capsys):
    """evaluate, goodnet, compact, finetune and classify take the directories of an adopted B and
    B' (through their ONNX) with no option about the model: the record says logits and 0..1."""
    from PIL import Image

    b_prime = bdpruning.prune_channels(copy.deepcopy(adopted), LAYER, [0, 1, 2])
    bd_dir, b_prime_dir = save_model_dir(adopted, tmp_path / "bd"), save_model_dir(b_prime, tmp_path / "b_prime")
    clean = write_h5(tmp_path / "clean.h5", *quadrants(120, 2))
    poisoned = write_h5(tmp_path / "poisoned.h5", *quadrants(40, 3, trigger=True))
    sets = ["--clean", str(clean), "--poisoned", str(poisoned), "--accelerator", "cpu"]
    assert main(["evaluate", "--model", str(b_prime_dir), *sets]) == 0
    assert main(["goodnet", "--bd", str(bd_dir), "--repaired", str(b_prime_dir), *sets, "--out", str(tmp_path / "gn")]) == 0
    assert main(["compact", "--model", str(b_prime_dir), "--out", str(tmp_path / "compact"), "--data", str(clean)]) == 0
    assert main(["finetune", "--model", str(b_prime_dir), "--clean-valid", str(clean), "--epochs", "1",
                 "--accelerator", "cpu", "--out", str(tmp_path / "tuned")]) == 0
    image = quadrants(1, 5)[0][0]  # class 0 (pixels 0..1): a PNG holds it as 0..255
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "face.png")
    capsys.readouterr()
    assert main(["classify", str(tmp_path / "face.png"), "--bd", str(bd_dir), "--repaired", str(bd_dir),
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "face.png"), "0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "b_prime", "bd", "clean.h5", "compact", "face.png", "gn", "poisoned.h5", "tuned"]  # nothing unasked


@pytest.mark.slow
def test_cli_fine_tunes_into_the_users_class_as_the_api_does_in_memory(adopted, tmp_path):
    """``--model-class``: the CLI loads the directory into the researcher's class (BatchNorm kept),
    and fine-pruning there gives the same weights as fine-pruning the model in memory."""
    from bdpruning.lightning_modules.finetune import finetune_model

    b_prime = bdpruning.prune_channels(copy.deepcopy(adopted), LAYER, [1, 2, 4])
    directory = save_model_dir(b_prime, tmp_path / "b_prime")
    clean = write_h5(tmp_path / "clean.h5", *quadrants(96, 2))
    assert main(["finetune", "--model", str(directory), "--model-class", f"{__name__}:TinyResNet", "--clean-valid",
                 str(clean), "--epochs", "1", "--accelerator", "cpu", "--out", str(tmp_path / "tuned")]) == 0
    in_memory = finetune_model(b_prime, str(clean), 1, accelerator="cpu", progress=False).model
    tuned = load_model(tmp_path / "tuned", "cpu", into=TinyResNet)
    expected, actual = plain_state_dict(in_memory), plain_state_dict(tuned)
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    assert masked_channels(tuned) == {LAYER: [1, 2, 4]}
