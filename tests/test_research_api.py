"""The research API on models bdpruning did not load: adopt -> sweep on a chosen conv -> B' ->
GoodNet -> compact, on a torchvision ResNet-18 and a small BatchNorm CNN, with the fast sweep
equal to a naive masked forward at every step (in float64, so equality is not left to round-off)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

import bdpruning
from bdpruning import BdpruningError
from bdpruning.numerics.roundoff import float64_reference, measure
from bdpruning.sweep.lab import naive_sweep_predictions, sweep_predictions
from helpers.nets import BatchNormCNN, randomize_batchnorm


CASES = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 16, 16), "layer1.0.conv1", "layer1.0.bn1", 10),
    "bn_cnn": (BatchNormCNN, (3, 16, 16), "conv2", "bn2", 4),
}


@pytest.mark.parametrize("case", [pytest.param("resnet18", marks=pytest.mark.slow), "bn_cnn"])
def test_adopt_sweep_save_goodnet_compact(case, tmp_path):
    build, shape, layer, rank_layer, classes = CASES[case]
    torch.manual_seed(0)
    model = randomize_batchnorm(build()).double()
    images = torch.rand(12, *shape, dtype=torch.float64) * 255
    labels = torch.randint(0, classes, (12,))
    bdpruning.adopt(model, outputs="logits", example=images[:2])
    assert bdpruning.model_info(model).num_classes == classes

    order = bdpruning.rank_channels(model, TensorDataset(images, labels), rank_layer).order
    fast = sweep_predictions(model, (images, labels), order[:6], layer, rank_layer, batch_size=5)
    assert torch.equal(fast, naive_sweep_predictions(model, (images, labels), order[:6], layer))

    float32 = bdpruning.adopt(copy.deepcopy(model).float(), outputs="logits", example=images[:2].float())
    result = bdpruning.run_sweep(float32, (images.float(), labels), (images.float(), torch.zeros_like(labels)),
                                 layer=layer, rank_layer=rank_layer, thresholds=(1,))
    assert result.masked_at == rank_layer  # the BatchNorm is masked with the conv: zero there
    saved = bdpruning.save_repaired(result, float32, tmp_path / "repaired")
    assert list(saved) == [1]
    pruned = result.ranking.order[: result.thresholds[0].step]
    repaired = bdpruning.load_model(saved[1], device="cpu")  # its ONNX graph (BatchNorms folded)
    expected = bdpruning.prune_channels(copy.deepcopy(float32).double(), layer, pruned)
    with torch.no_grad():  # the same function up to float32 round-off
        reloaded = repaired(images.float()).numpy()
    assert measure(float64_reference(expected, images.float().numpy()), reloaded).explained_by_round_off
    with torch.no_grad():
        flagged = bdpruning.GoodNet(model, expected)(images) == classes
        assert torch.equal(flagged, model(images).argmax(1) != expected(images).argmax(1))

    compact = copy.deepcopy(expected)
    bdpruning.compact_model(compact)
    assert bdpruning.model_cost(compact).parameters < bdpruning.model_cost(expected).parameters
    with torch.no_grad():
        assert (compact(images) - expected(images)).abs().max() <= 1e-9


def test_an_unadopted_model_is_told_how_to_adopt_it(tmp_path):
    with pytest.raises(BdpruningError, match=r"bdpruning.adopt\(model, outputs="):
        bdpruning.GoodNet(BatchNormCNN(), BatchNormCNN())
    with pytest.raises(BdpruningError, match="outputs must be 'logits' or 'probabilities'"):
        bdpruning.adopt(BatchNormCNN(), outputs="scores", example=torch.zeros(1, 3, 16, 16))
    with pytest.raises(BdpruningError, match="needs the input shape"):
        bdpruning.adopt(BatchNormCNN(), outputs="logits")
    with pytest.raises(BdpruningError, match="expected \\(batch, classes\\)"):
        bdpruning.adopt(nn.Conv2d(3, 4, 3), outputs="logits", example=torch.zeros(1, 3, 16, 16))
