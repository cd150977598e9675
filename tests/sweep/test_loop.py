"""The one pruning loop: every criterion goes through it, the engine is chosen where it applies,
and the stage's typed summaries write the JSON the stage always wrote."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bdpruning import MeanActivation, run_sweep, sweep_criterion
from bdpruning.criteria.base import ChannelScores
from bdpruning.sweep.loop import choose_engine, sweep_scores
from bdpruning.sweep.masked import MaskedEngine
from bdpruning.sweep.split_engine import SplitEngine
from bdpruning.workflows.summary import CriterionSummary, LabSummary
from helpers.nets import IntNet, small_deepid


def _int_data(count: int, seed: int, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 48, 40), generator=generator).float()
    return images, torch.randint(0, classes, (count,), generator=generator)


def test_the_engine_is_the_split_one_for_one_layer_and_the_masked_one_across_layers():
    model = small_deepid().eval()
    split = choose_engine(model, [("conv_3", 4), ("conv_3", 9)], "pool_3")
    assert isinstance(split, SplitEngine) and split.masked_at == "pool_3"
    assert isinstance(choose_engine(model, [("conv_3", 4)]), SplitEngine)  # split after the layer itself
    assert isinstance(choose_engine(model, [("conv_2", 1), ("conv_3", 4)]), MaskedEngine)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return self.head(x.mean(dim=(2, 3)))


def test_a_model_the_split_engine_cannot_trace_is_swept_by_the_masked_engine():
    assert isinstance(choose_engine(_Untraceable().eval(), [("conv", 1)]), MaskedEngine)


def test_both_engines_count_exactly_the_same_on_an_exact_integer_net():
    """IntNet's values are exact float32 integers, so any difference would be an engine's error."""
    model = IntNet().eval()
    images, labels = _int_data(40, seed=3)
    data = (images, labels)
    order = [("block2.conv", c) for c in (3, 0, 5, 1, 4, 2)]
    steps = list(range(len(order) + 1))
    split = choose_engine(model, order, "block2.pool")
    assert isinstance(split, SplitEngine) and split.masked_at == "block2.pool"
    from bdpruning.data.forms import as_image_data

    data = as_image_data(data)
    counted = split.counts(data, order, steps, 16, False)
    assert counted == MaskedEngine(model).counts(data, order, steps, 16, False)
    assert counted[1:4] == split.counts(data, order, [1, 2, 3], 7, False)  # any steps, any batching
    assert len(set(counted)) > 1  # pruning changes predictions


def test_the_mean_activation_goes_through_the_loop_as_the_lab_sweep_with_the_split_engine():
    model = IntNet().eval()
    clean, poisoned = _int_data(48, seed=1), _int_data(20, seed=2)
    lab = run_sweep(model, clean, poisoned, layer="block2.conv", rank_layer="block2.pool", thresholds=(5, 20))
    result = sweep_criterion(model, MeanActivation("block2.conv", "block2.pool"), clean, poisoned, thresholds=(5, 20))
    assert result.masked_at == "block2.pool"  # ranked and swept on the split's prefix outputs
    assert [c for _, c in result.scores.order] == lab.ranking.order
    assert [(s.step, s.clean_accuracy, s.attack_success_rate) for s in result.steps] == \
        [(s.step, s.clean_accuracy, s.attack_success_rate) for s in lab.steps]
    assert result.thresholds == lab.thresholds
    # the same scores swept by the masked engine (as for a criterion across layers) agree
    masked = sweep_scores(model, result.scores, clean, poisoned, thresholds=(5, 20))
    assert [s.clean_accuracy for s in masked.steps] == [s.clean_accuracy for s in result.steps]


def test_the_lab_summary_writes_the_stage_json_keys_in_order():
    model = IntNet().eval()
    images, _ = _int_data(48, seed=1)
    with torch.no_grad():
        clean = (images, model(images).argmax(dim=1))  # 100 % at step 0: pruning can only lower it
    result = run_sweep(model, clean, _int_data(20, seed=2), layer="block2.conv", rank_layer="block2.pool",
                       thresholds=(5, 99))
    summary = json.loads(LabSummary.of(result).to_json())
    assert list(summary) == ["layer", "rank_layer", "channels", "clean_samples", "poisoned_samples", "baseline",
                             "thresholds", "full_sweep", "steps_recorded"]
    reached, never = summary["thresholds"]
    assert list(reached) == ["threshold", "reached", "step", "channels_pruned", "fraction_pruned", "clean_accuracy",
                             "attack_success_rate", "accuracy_drop", "pruned_channels", "model_dir"]
    assert never == {"threshold": 99, "reached": False}
    assert reached["pruned_channels"] == result.ranking.order[: reached["step"]]
    assert reached["model_dir"] == "repaired_5pct"
    assert summary["steps_recorded"] == len(result.all_steps) - 1  # a threshold never reached: every step


def test_a_criterion_summary_names_its_choice_and_parameter():
    model = IntNet().eval()
    order = [("block2.conv", 2), ("block3.conv", 0), ("block2.conv", 5)]
    scores = ChannelScores("made-up", "a score", {"block2.conv": [0.0] * 6, "block3.conv": [1.0] * 6}, order,
                           selected=2, parameter="u", points={3.0: 2, 1.0: 3}, settings={"u": 3.0})
    result = sweep_scores(model, scores, _int_data(30, seed=4))
    assert [s.step for s in result.steps] == [0, 2, 3]  # only the choice and the points are evaluated
    summary = CriterionSummary.of(result).to_dict()
    assert summary["chosen"]["u"] == 3.0 and summary["chosen"]["channels_pruned"] == 2
    assert summary["chosen"]["pruned_channels"] == {"block2.conv": [2], "block3.conv": [0]}
    assert summary["chosen"]["model_dir"] == "repaired_made-up"
    assert [p["channels_pruned"] for p in summary["points"]] == [2, 3]
