"""The sweep is exact: its fast engines give, at every step, the labels of the pruned model's
plain forward (on DeepID, other architectures, every data form, without room to cache, with masks
across layers), and two DDP processes sweep exactly as one."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import bdpruning
from bdpruning.criteria.activation_means import rank_channels
from bdpruning.evaluation.predict import predict_labels
from bdpruning.sweep.lab import naive_sweep_predictions, run_sweep, sweep_predictions
from bdpruning.sweep.masked import masked_sweep_predictions
from helpers.cli import bdprune
from helpers.data import FORMS, noisy_faces, random_colour_set, write_h5_set
from helpers.material import BD_WEIGHTS
from helpers.nets import IntNet, SkipNet, half_batchnorm_net, randomize_batchnorm


def _assert_same_sweeps(fast: torch.Tensor, naive: torch.Tensor) -> None:
    assert fast.shape == naive.shape and torch.equal(fast, naive)


def test_fast_sweep_equals_naive_sweep_on_deepid(bd_weights, face_set, tmp_path):
    """In float64, so that equality is not left to round-off: the fast sweep computes each step
    on other batches than a plain forward does, which in float32 may flip a near-tie."""
    model = bdpruning.load_model(bd_weights, device="cpu").double()
    whole = bdpruning.read_h5_dataset(face_set, 1283)
    images = whole.read(0, 48).numpy().astype(np.uint8)
    data = bdpruning.read_h5_dataset(write_h5_set(tmp_path / "48.h5", images, whole.labels[:48].numpy()), 1283)
    order = rank_channels(model, data, "pool_3").order
    fast = sweep_predictions(model, data, order, "conv_3", "pool_3", batch_size=20)
    _assert_same_sweeps(fast, naive_sweep_predictions(model, data, order, "conv_3"))
    assert fast.shape == (61, 48) and (fast[-1] != fast[0]).any()  # the sweep does change predictions


def test_fast_sweep_equals_naive_sweep_on_another_architecture(tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm(SkipNet()).double()
    data = random_colour_set(tmp_path)
    order = rank_channels(model, data, "block").order
    fast = sweep_predictions(model, data, order, "block", "bn", batch_size=16)
    _assert_same_sweeps(fast, naive_sweep_predictions(model, data, order, "block"))
    assert (fast[-1] != fast[0]).any()


def test_sweep_without_room_to_cache_recomputes_the_same_results(bd_weights, face_set):
    model = bdpruning.load_model(bd_weights, device="cpu")
    data = bdpruning.read_h5_dataset(face_set, 1283)
    cached = run_sweep(model, data, data, batch_size=50, full_sweep=True)
    streamed = run_sweep(model, data, data, batch_size=50, full_sweep=True, cache_bytes=0)
    assert streamed.all_steps == cached.all_steps and streamed.ranking == cached.ranking


def test_masked_sweep_equals_pruned_models_at_every_step():
    """In float64, on a net with a BatchNorm after a pruned conv: the masked sweep's labels are
    those of the pruned model's plain forward, at every step and at chosen steps."""
    model = half_batchnorm_net().double()
    with torch.no_grad():  # outputs that vary from image to image
        model.head.weight.mul_(20)
        model.conv_b.weight.mul_(3)
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(40, 3, 1, 1, generator=generator) * 200 + torch.rand(40, 3, 8, 8, generator=generator) * 55
    labels = torch.zeros(40, dtype=torch.int64)
    order = [("conv_a", 2), ("conv_b", 1), ("conv_a", 0), ("conv_a", 5), ("conv_b", 4), ("conv_b", 0)]
    naive = []
    for k in range(len(order) + 1):
        pruned = copy.deepcopy(model)
        for layer, channel in order[:k]:
            bdpruning.prune_channels(pruned, layer, [channel])
        naive.append(predict_labels(pruned, (images, labels)))
    naive = torch.stack(naive)
    assert torch.equal(masked_sweep_predictions(model, (images, labels), order, batch_size=16), naive)
    assert torch.equal(masked_sweep_predictions(model, (images, labels), order, [1, 4, 6]), naive[[1, 4, 6]])
    assert (naive[-1] != naive[0]).any()


@pytest.mark.parametrize("form", FORMS)
def test_the_sweep_on_every_data_form_equals_the_sweep_on_the_h5_set(form, random_pixels_h5, random_pixels):
    model = IntNet().eval()
    data = FORMS[form](random_pixels_h5, *random_pixels)
    reference = run_sweep(model, bdpruning.read_h5_dataset(random_pixels_h5), bdpruning.read_h5_dataset(random_pixels_h5),
                          layer="block2.conv", rank_layer="block2.pool", thresholds=(1,), full_sweep=True,
                          batch_size=16)
    result = run_sweep(model, data, FORMS[form](random_pixels_h5, *random_pixels), layer="block2.conv", rank_layer="block2.pool",
                       thresholds=(1,), full_sweep=True, batch_size=16)
    assert result.ranking == reference.ranking and result.all_steps == reference.all_steps
    assert result.clean_samples == 45 and result.masked_at == "block2.pool"
    assert len({s.clean_accuracy for s in result.all_steps}) > 1  # pruning changes predictions


@pytest.mark.parametrize("form", ["(x, y) tensors", "DataLoader", "map-style Dataset"])
def test_fast_sweep_and_predictions_take_every_form_and_stay_exact(form, random_pixels_h5, random_pixels):
    model = IntNet().eval()
    data = FORMS[form](random_pixels_h5, *random_pixels)
    order = bdpruning.rank_channels(model, data, "block2.pool").order
    fast = sweep_predictions(model, data, order, "block2.conv", "block2.pool", batch_size=10)
    assert torch.equal(fast, naive_sweep_predictions(model, random_pixels_h5, order, "block2.conv", batch_size=32))
    assert torch.equal(predict_labels(model, data, batch_size=9), fast[0])


def test_two_ddp_processes_sweep_exactly_as_one(bd_weights, face_images, tmp_path, capsys):
    images = noisy_faces(face_images, 41)  # odd: the shards hold 21 and 20 images
    labels = np.where(np.arange(41) % 2 == 0, 860, 0)
    clean = write_h5_set(tmp_path / "clean.h5", images, labels)
    poisoned = write_h5_set(tmp_path / "poisoned.h5", images[1::2], np.zeros(20))
    common = ["prune", "--model", str(BD_WEIGHTS), "--clean-valid", str(clean), "--poisoned-valid", str(poisoned),
              "--thresholds", "2", "4", "10", "--full-sweep", "--batch-size", "8", "--no-progress"]
    code, _, err = bdprune(capsys, *common, "--out", tmp_path / "one", "--accelerator", "cpu")
    assert code == 0, err
    result = subprocess.run([sys.executable, "-m", "bdpruning.cli", *common, "--out", str(tmp_path / "two"),
                             "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("baseline:") == 1  # only the first process reports
    one, two = (json.loads((tmp_path / run / "sweep.json").read_text()) for run in ("one", "two"))
    assert two["ranking"] == one["ranking"]  # channels and their mean activations, to the last bit
    assert two["steps"] == one["steps"] and len(one["steps"]) == 61
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two")]
    assert summaries[1]["thresholds"] == summaries[0]["thresholds"]
