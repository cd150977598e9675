"""Any torch data, any traceable model: data forms, bad data, ambiguous and upstream layers, copies."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import bdpruning
from bdpruning import BdpruningError, as_image_data
from bdpruning.pruning.masks import masked_channels
from bdpruning.evaluation.predict import predict_labels
from bdpruning.sweep.lab import run_sweep
from helpers.data import PairDataset, write_h5_set
from helpers.nets import IntNet


def test_rank_channels_on_a_tensor_dataset_ranks_channels_not_height():
    torch.manual_seed(0)
    model = bdpruning.DeepID(5).eval()
    images, labels = torch.rand(6, 3, 55, 47) * 255, torch.randint(0, 5, (6,))
    ranking = bdpruning.rank_channels(model, TensorDataset(images, labels), "pool_3", batch_size=4)
    assert len(ranking.order) == 60 and ranking.samples == 6
    assert ranking == bdpruning.rank_channels(model, (images, labels), "pool_3", batch_size=4)  # the same batches


def _not_pairs(x: torch.Tensor, y: torch.Tensor) -> Dataset:
    return TensorDataset(x)


BAD_DATA = {
    "numpy images": (lambda x, y: x.numpy(), "convert numpy arrays with torch.from_numpy"),
    "numpy pair": (lambda x, y: (x.numpy(), y.numpy()), "convert numpy arrays with torch.from_numpy"),
    "images alone": (lambda x, y: x, "a tensor alone has no labels"),
    "a path that is not a file": (lambda x, y: "no/such/set.h5", "no/such/set.h5: no such file"),
    "a directory": (lambda x, y: Path(__file__).parent, "data: is a directory"),
    "unbatched image": (lambda x, y: (x[0], y[:1]), "a single unbatched image?"),
    "wrong-rank labels": (lambda x, y: (x, y[:, None]), "labels have shape (45, 1), expected (45,)"),
    "too few labels": (lambda x, y: (x, y[:-1]), "expected (45,) for 45 images"),
    "float labels": (lambda x, y: (x, y.float()), "labels have dtype torch.float32, expected integers"),
    "negative labels": (lambda x, y: (x, y - 1), "labels range -1.."),
    "bool images": (lambda x, y: (x > 0, y), "expected a float or integer dtype"),
    "Dataset of non-pairs": (_not_pairs, "item 0 is a tuple of 1; expected an (image, label) pair"),
    "Dataset of batched items": (lambda x, y: PairDataset(x[:, None], y), "expected a tensor (C, H, W)"),
    "DataLoader of non-pairs": (lambda x, y: DataLoader(_not_pairs(x, y), batch_size=8),
                                "batch 0 is a list of 1; expected an (images, labels) pair"),
    "DataLoader of single images": (lambda x, y: DataLoader(TensorDataset(x, y), batch_size=None),
                                    "a single unbatched image?"),
    "shuffling DataLoader": (lambda x, y: DataLoader(TensorDataset(x, y), shuffle=True), "use shuffle=False"),
    "a list of numbers": (lambda x, y: [1, 2, 3], "got a list of 3 items"),
    "a number": (lambda x, y: 5, "got a value of type int"),
    "an empty set": (lambda x, y: (x[:0], y[:0]), "the data set is empty"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_one_line_naming_what_was_expected(case, random_pixels):
    make, message = BAD_DATA[case]
    model = IntNet().eval()
    for call in (lambda d: bdpruning.rank_channels(model, d, "block2.pool"),
                 lambda d: run_sweep(model, d, layer="block2.conv", rank_layer="block2.pool"),
                 lambda d: predict_labels(model, d)):
        with pytest.raises(BdpruningError) as error:
            call(make(*random_pixels))
        assert message in str(error.value) and "\n" not in str(error.value)


def test_expected_classes_and_image_shape_are_checked(random_pixels, random_pixels_h5):
    for data in (random_pixels, random_pixels_h5, DataLoader(TensorDataset(*random_pixels), batch_size=8)):
        with pytest.raises(BdpruningError, match=r"labels range 0\.\.3, outside the model's 3 classes"):
            list(as_image_data(data, num_classes=3).batches(64))
        with pytest.raises(BdpruningError, match=r"images have shape \(3, 48, 40\).*\(3, 55, 47\)"):
            list(as_image_data(data, image_shape=(3, 55, 47)).batches(64))


def test_the_model_directory_checks_run_sweep_data(random_pixels):
    from bdpruning.models import ModelInfo, attach_info

    model = attach_info(IntNet(classes=4).eval(), ModelInfo("custom", 3, (3, 48, 40), "test"))
    with pytest.raises(BdpruningError, match="outside the model's 3 classes"):
        run_sweep(model, random_pixels, layer="block2.conv", rank_layer="block2.pool")


@pytest.mark.parametrize("short", ["bn2", "0"])
def test_an_ambiguous_short_layer_name_is_refused_with_its_candidates(short):
    model = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(BdpruningError) as error:
        bdpruning.find_layer(model, short)
    message = str(error.value)
    assert message.startswith(f"ambiguous layer {short!r}: it matches layer1.0.") and "\n" not in message
    assert "layer1.0.bn2" in message and "layer4.0.bn2" in message
    assert bdpruning.find_layer(model, "layer1.0.bn2")[0] == "layer1.0.bn2"  # a full name always wins
    assert bdpruning.find_layer(model, "conv1")[0] == "conv1"


def test_a_keras_name_means_the_weighted_node_of_its_layer():
    layers = {"model/conv_3/BiasAdd": nn.Conv2d(3, 4, 3), "model/conv_3/Relu": nn.ReLU(),
              "model/fc_1/MatMul": nn.Identity(), "model/fc_1/BiasAdd": nn.Identity()}
    model = nn.Module()
    for name, module in layers.items():
        model.add_module(name, module)
    assert bdpruning.find_layer(model, "conv_3")[0] == "model/conv_3/BiasAdd"
    with pytest.raises(BdpruningError, match="ambiguous layer 'fc_1': it matches model/fc_1/MatMul, model/fc_1/BiasAdd"):
        bdpruning.find_layer(model, "fc_1")


@pytest.mark.parametrize("rank_layer", ["block2.pool", "block1.conv"])
def test_an_upstream_rank_layer_is_refused(random_pixels, rank_layer):
    model = IntNet().eval()  # block2.pool has the pruned layer's 6 channels: the count alone passes
    with pytest.raises(BdpruningError) as error:
        run_sweep(model, random_pixels, layer="block3.conv", rank_layer=rank_layer)
    assert str(error.value) == (f"rank layer {rank_layer!r} is upstream of the pruned layer 'block3.conv', so pruning "
                                "cannot change it; choose a rank layer fed by 'block3.conv'")


def test_a_rank_layer_on_another_branch_is_refused(random_pixels):
    class TwoBranches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.left, self.right = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled = [torch.amax(branch(x), dim=(2, 3)) for branch in (self.left, self.right)]
            return self.head(torch.cat(pooled, dim=1))

    with pytest.raises(BdpruningError, match="rank layer 'right' is not fed by the pruned layer 'left'"):
        run_sweep(TwoBranches().eval(), random_pixels, layer="left", rank_layer="right")


def test_a_masked_model_deep_copies_after_a_training_step_and_keeps_its_masks():
    torch.manual_seed(0)
    model = bdpruning.DeepID(5)
    bdpruning.prune_channels(model, "conv_3", [1, 2])
    bdpruning.prune_channels(model, "conv_3", [7])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    model(torch.rand(2, 3, 55, 47) * 255).sum().backward()
    assert model.conv_3.weight_orig.grad.abs().sum() > 0  # gradients still reach the unmasked weights
    optimizer.step()
    twin = copy.deepcopy(model)
    assert masked_channels(twin) == {"conv_3": [1, 2, 7]}
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=1e-2)
    twin(torch.rand(2, 3, 55, 47) * 255).sum().backward()
    twin_optimizer.step()
    copy.deepcopy(twin)
    assert bdpruning.zeroed_channels(twin, "conv_3") == [1, 2, 7]
    assert not torch.equal(twin.conv_3.weight_orig, model.conv_3.weight_orig)  # the copy trains on its own


def test_fine_tuning_and_evaluation_take_tensors_and_datasets_like_h5_files(tmp_path):
    from bdpruning.lightning_modules.evaluation import evaluate_model
    from bdpruning.lightning_modules.finetune import finetune_model
    from bdpruning.pruning.masks import plain_state_dict
    from helpers.data import quadrant_images
    from helpers.nets import small_deepid

    (train_x, train_y), (eval_x, eval_y) = quadrant_images(23, seed=0), quadrant_images(9, seed=1)
    train_h5 = write_h5_set(tmp_path / "train.h5", train_x, train_y)
    eval_h5 = write_h5_set(tmp_path / "eval.h5", eval_x, eval_y)
    tensors = (torch.from_numpy(train_x), torch.from_numpy(train_y))
    options = {"batch_size": 8, "seed": 1, "accelerator": "cpu"}
    reference = finetune_model(small_deepid(), train_h5, 1, clean_eval=eval_h5, **options)
    result = finetune_model(small_deepid(), tensors, 1, clean_eval=PairDataset(*map(torch.from_numpy, (eval_x, eval_y))),
                            **options)
    expected, got = plain_state_dict(reference.model), plain_state_dict(result.model)
    assert all(torch.equal(expected[name], got[name]) for name in expected)  # the same batches, bit for bit
    assert result.history == reference.history
    assert result.sets == {"train": "(images, labels) tensors", "clean_eval": "dataset PairDataset",
                           "poisoned_eval": None}
    counts = evaluate_model(result.model, TensorDataset(torch.from_numpy(eval_x), torch.from_numpy(eval_y)),
                            batch_size=8, accelerator="cpu")  # the batches of the fine-tuning's evaluation
    assert counts.clean_correct == result.after.evaluation.clean_correct and counts.clean_images == 9
    with pytest.raises(BdpruningError, match="pass the DataLoader's dataset instead"):
        finetune_model(small_deepid(), DataLoader(TensorDataset(*tensors), batch_size=8), 1, **options)
