"""The incremental exact sweep: the layers a pruned channel reaches alone updated by its
contribution, the rest recomputed, float32 re-runs of the suffix only where round-off (the
updates' accumulated round-off included) could flip a label. Step by step, its labels equal a naive sweep's in float64 wherever
the float64 margin is safe, on a DeepID (random, the demo's, the Lab-3 BadNet) and a BatchNorm
ResNet; a forced tie shows the re-run path."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torchvision.models.resnet import BasicBlock, ResNet
from torch import nn

from bdpruning import adopt, load_model, prune_channels, rank_channels
from bdpruning.data.forms import as_image_data
from bdpruning.graph.split import split_at
from bdpruning.models.outputs import logits_model
from bdpruning.numerics.roundoff import LAMBDA, UNIT_ROUNDOFF, accumulation_depth
from bdpruning.sweep.incremental import RECOMPUTED, UPDATED, WORTH
from bdpruning.sweep.split_engine import SplitEngine, chunk_predictions
from helpers.material import BD_WEIGHTS
from helpers.conditions import need_shared
from helpers.nets import randomize_batchnorm, small_deepid


@torch.inference_mode()
def _naive64(model: nn.Module, images: torch.Tensor, layer: str, order: list[int]) -> torch.Tensor:
    """Float64 logits of the pruned model after each step (row 0: nothing pruned), each step a
    full forward of a freshly pruned copy: the reference procedure."""
    double = copy.deepcopy(model).double().eval()
    rows = []
    for step in range(len(order) + 1):
        pruned = prune_channels(copy.deepcopy(double), layer, order[:step]) if step else double
        net = logits_model(pruned) or pruned
        rows.append(net(images.double()))
    return torch.stack(rows)


def _safe(logits: torch.Tensor, depth: int) -> torch.Tensor:
    """Where no float32 computation can change the float64 top-1 (roundoff's bound)."""
    top2 = logits.topk(2, dim=-1).values
    bound = LAMBDA * math.sqrt(depth) * UNIT_ROUNDOFF * logits.abs().amax(dim=-1).clamp_min(1.0)
    return top2[..., 0] - top2[..., 1] > 2 * bound


def _engine_labels(engine: SplitEngine, images: torch.Tensor, order: list[int]) -> torch.Tensor:
    data = as_image_data((images, torch.zeros(len(images), dtype=torch.int64)))
    with torch.inference_mode():
        columns = [torch.stack(list(chunk_predictions(engine.split.suffix, values, order, engine.incremental,
                                                        engine.force)))
                   for values, _ in engine.prefix_chunks(data, 16, "test", False)]
    return torch.cat(columns, dim=1)


def _incremental_logits(model: nn.Module, engine: SplitEngine, images: torch.Tensor,
                        order: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The engine's logits after each step (what its labels are decided on), the same logits
    from a float64 suffix re-run in full on the masked float32 prefix outputs, and the engine's
    round-off bound for each step (relative to the largest logit)."""
    head = engine.incremental
    suffix = copy.deepcopy(split_at(logits_model(model) or model, engine.masked_at).suffix).double()
    with torch.inference_mode():
        prefix = engine.split.prefix(images.contiguous(memory_format=torch.channels_last)
                                     if engine.split.channels_last else images)
        state = head.start(prefix)
        rows, reference, bounds = [], [], []
        masked = prefix[0].double().clone()
        everyone = torch.arange(len(images))
        for channel in order:
            rows.append(head.step(state, everyone, channel).double())
            bounds.append(LAMBDA * math.sqrt(head.rounding_depth(state)) * UNIT_ROUNDOFF)
            masked[:, channel] = 0
            reference.append(suffix(masked, *(v.double() for v in prefix[1:])))
    return torch.stack(rows), torch.stack(reference), torch.tensor(bounds, dtype=torch.float64)


def _check_exact(model: nn.Module, images: torch.Tensor, layer: str, rank_layer: str | None,
                 order: list[int]) -> torch.Tensor:
    """The engine's labels equal the naive float64 sweep's wherever its margin is safe, and its
    float64 logits equal the naive ones to float64 round-off; returns the labels."""
    engine = SplitEngine(model, layer, rank_layer, incremental=True)  # forced, even where not cheaper
    assert engine.incremental is not None  # the incremental path applies here
    labels = _engine_labels(engine, images, order)
    reference = _naive64(model, images, layer, order)
    safe = _safe(reference, accumulation_depth(model))
    assert safe.float().mean() > 0.95
    assert torch.equal(labels[safe], reference.argmax(dim=-1)[safe])
    assert engine.incremental.updates > 0
    logits, rerun, bounds = _incremental_logits(model, SplitEngine(model, layer, rank_layer, incremental=True),
                                                images, order)
    # round-off only, the updates' accumulated round-off included: within the bound the engine
    # relies on at each step
    scale = rerun.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
    assert ((logits - rerun).abs() / scale).amax(dim=(1, 2)).le(bounds).all()
    return labels


def test_deepid_updates_the_layers_the_channel_reaches_alone_and_recomputes_the_rest():
    """Split at pool_3: fc_1 and conv_4 see the pruned channel alone (a block of fc_1's columns,
    one input channel of conv_4) and are updated; conv_4's ReLU spreads the change, so it, fc_2,
    the sum, its ReLU and the output layer are recomputed. Each step adds to the logits' depth
    one channel's share of fc_1's and conv_4's fan-ins (1,200 / 60 and 240 / 60), one for the
    flatten, one for adding the change and the 20 products of the channel's map (5 x 4 values)."""
    model = small_deepid(pruned=[]).eval()
    engine = SplitEngine(model, "conv_3", "pool_3")
    head = engine.incremental
    kinds = {node.name: kind for node, kind in head.kinds.items()}
    assert {name for name, kind in kinds.items() if kind == UPDATED} == {"split_value", "flatten_1", "fc_1", "conv_4"}
    assert {name for name, kind in kinds.items() if kind == RECOMPUTED} >= {"fc_2", "add", "output"}
    with torch.inference_mode():
        state = head.start(engine.split.prefix(_digits_like(2, seed=5).contiguous(memory_format=torch.channels_last)))
        for channel in range(3):
            head.step(state, torch.arange(2), channel)
    assert head.maps.shape == (60, 20, 960 + 160)  # to conv_4's and fc_1's values
    assert head.step_depth == 1 + 1200 / 60 + 240 / 60 + 1 + 20
    assert head.rounding_depth(state) == accumulation_depth(model) + 3 * head.step_depth


def test_the_channel_maps_and_the_layer_by_layer_updates_agree():
    """The same steps with each channel's map and, where the maps would not fit, layer by layer:
    two float32 computations of the same logits, within both of their round-off bounds."""
    model = small_deepid(pruned=[]).eval()
    images = _digits_like(6, seed=6)
    logits, bounds = [], []
    for map_bytes in (64 << 20, 0):
        engine = SplitEngine(model, "conv_3", "pool_3", incremental=True)
        head = engine.incremental
        head.map_bytes = map_bytes
        with torch.inference_mode():
            state = head.start(engine.split.prefix(images.contiguous(memory_format=torch.channels_last)))
            steps = [head.step(state, torch.arange(6) if c % 2 else torch.tensor([1, 4]), c) for c in range(0, 60, 7)]
        assert (head.maps is None) == (map_bytes == 0)
        logits.append(torch.cat(steps).double())
        bounds.append(LAMBDA * math.sqrt(head.rounding_depth(state)) * UNIT_ROUNDOFF)
    scale = logits[1].abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    assert ((logits[0] - logits[1]).abs() / scale).max() <= sum(bounds)


def test_the_incremental_path_is_taken_where_it_is_estimated_cheaper():
    """DeepID: the updates cost a small share of fc_1 and conv_4, and fc_2 is recomputed: about
    a third of the suffix. A ResNet's suffix after its last block is a ReLU, a pooling and a small
    dense layer, all recomputed: cheaper to re-run as it is."""
    images = _digits_like(4, seed=0)
    for model, layer, rank_layer, example, taken in [
            (small_deepid(pruned=[]).eval(), "conv_3", "pool_3", images, True),
            (adopt(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval(), outputs="logits",
                   example=torch.zeros(1, 3, 32, 32)), "layer4.0.conv2", None, torch.rand(4, 3, 32, 32), False)]:
        engine = SplitEngine(model, layer, rank_layer)  # automatic
        with torch.inference_mode():
            prefix = engine.split.prefix(example.contiguous(memory_format=torch.channels_last)
                                         if engine.split.channels_last else example)
            assert (engine.incremental.cost_ratio(prefix) <= WORTH) == taken
        _engine_labels(engine, example, [0, 1, 2])
        assert (engine.incremental.updates > 0) == taken


def _digits_like(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, 55, 47, generator=generator) * 255


def test_incremental_sweep_equals_the_naive_float64_sweep_on_a_deepid():
    model = small_deepid(pruned=[]).eval()
    images = _digits_like(24, seed=1)
    order = rank_channels(model, (images, torch.zeros(24, dtype=torch.int64)), "pool_3").order[:20]
    labels = _check_exact(model, images, "conv_3", "pool_3", order)
    assert len(set(labels.flatten().tolist())) > 1  # the steps change labels


def test_a_tie_within_the_bound_is_rerun_in_float32():
    """Classes 0 and 1 get identical output weights: every image whose top-2 they are has a zero
    margin, which float64 cannot decide, so it must be re-run through the float32 suffix."""
    model = small_deepid(pruned=[]).eval()
    with torch.no_grad():
        model.output.bias[0] += 50  # the top two...
        model.output.weight[1] = model.output.weight[0]
        model.output.bias[1] = model.output.bias[0]  # ...and tied
    images = _digits_like(16, seed=2)
    order = list(range(12))
    engine = SplitEngine(model, "conv_3", "pool_3", incremental=True)
    labels = _engine_labels(engine, images, order)
    assert engine.incremental.fallbacks > 0
    plain = _engine_labels(SplitEngine(model, "conv_3", "pool_3", incremental=False), images, order)
    tied = (labels != plain)  # only a float32 tie may be broken another way by another batching
    assert set(labels[tied].tolist()) <= {0, 1} and set(plain[tied].tolist()) <= {0, 1}
    assert set(labels.flatten().tolist()) <= {0, 1}


@pytest.mark.parametrize("layer, every", [("layer4.0.conv2", 11), ("layer4.0.conv1", 23)])
def test_incremental_sweep_on_a_batchnorm_resnet(layer, every):
    """The change crosses a BatchNorm, a skip connection's sum, a ReLU and average pooling; after
    conv1 the recomputed sum reads the skip connection, a value pruning does not change."""
    torch.manual_seed(0)
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)  # a ResNet-10: one block per stage
    model = adopt(randomize_batchnorm(net, seed=1), outputs="logits", example=torch.zeros(1, 3, 32, 32))
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(8, 3, 32, 32, generator=generator)
    labels = _check_exact(model, images, layer, None, list(range(0, 512, every)))
    assert len(set(labels.flatten().tolist())) > 1  # the steps change labels


@pytest.mark.slow
def test_incremental_sweep_on_the_lab3_badnet(face_set):
    model = load_model(need_shared(BD_WEIGHTS), device="cpu")
    data = as_image_data(str(face_set))
    images = data.first_images(40)
    order = rank_channels(model, str(face_set), "pool_3").order
    _check_exact(model, images, "conv_3", "pool_3", order)


@pytest.mark.slow
def test_incremental_sweep_on_the_demo_badnet(tmp_path):
    from bdpruning.demo import build_demo

    demo = build_demo(tmp_path / "demo")
    model = load_model(demo.bd_net, device="cpu")
    images = as_image_data(str(demo.clean_valid)).first_images(48)
    order = rank_channels(model, str(demo.clean_valid), "pool_3").order
    _check_exact(model, images, "conv_3", "pool_3", order)


def test_a_float64_model_sweeps_by_re_running_its_suffix():
    """The bound is float32's: a float64 model keeps the plain engine (and its own precision)."""
    model = small_deepid(pruned=[]).eval().double()
    assert SplitEngine(model, "conv_3", "pool_3").incremental is None
    images = _digits_like(4, seed=7).double()
    labels = _engine_labels(SplitEngine(model, "conv_3", "pool_3"), images, [0, 5, 9])
    assert torch.equal(labels, _naive64(model, images, "conv_3", [0, 5, 9]).argmax(dim=-1))
