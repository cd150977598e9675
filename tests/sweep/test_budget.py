"""The clean-accuracy budget: it caps a criterion's choice at the most-pruned step of the
criterion's own order whose drop, on clean images the criterion did not learn from, is within it."""

from __future__ import annotations

import logging

import pytest

from bdpruning import BdpruningError
from bdpruning.criteria import ANP, CLP
from bdpruning.sweep.budget import within_budget
from bdpruning.sweep.loop import sweep_criterion
from helpers.planted import planted_data, planted_net


@pytest.fixture(autouse=True)
def quiet_lightning():
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def test_the_budget_caps_a_choice_that_would_cost_fifty_points():
    clean, poisoned = planted_data(256, seed=0), planted_data(128, seed=1, poisoned=True)
    greedy = CLP(u=-10.0, convs_without_batchnorm=True)  # every channel above mean - 10 std: all 16
    raw = sweep_criterion(planted_net(), greedy, clean, poisoned)
    assert raw.chosen.step == 16 and raw.chosen.accuracy_drop >= 50
    capped = sweep_criterion(planted_net(), greedy, clean, poisoned, max_accuracy_drop=5.0, full_sweep=True)
    budget = capped.scores.budget
    assert budget["raw"] == 16 and budget["step"] < 16 and budget["held_out"] == 256  # CLP learns from none
    assert capped.chosen.step == budget["step"] and capped.chosen.accuracy_drop <= 5.0
    assert capped.at(16).accuracy_drop >= 50  # the raw choice is reported beside it
    assert budget["held_out_drop"] <= 5.0 < budget["raw_held_out_drop"]
    # the most-pruned step within the budget (CLP's held-out split is the whole clean set)
    assert all(step.accuracy_drop > 5.0 for step in capped.steps[budget["step"] + 1:])


def test_within_budget_keeps_the_most_pruned_step_and_counts_exact_drops():
    assert within_budget([100, 99, 95, 97, 80], 100, 3.0) == 3  # not monotone: step 3 is back within
    assert within_budget([100, 98, 97], 100, 3.0) == 2  # exactly 3 points is within
    assert within_budget([100, 90], 100, 3.0) == 0


def test_a_learned_criterion_is_judged_on_the_clean_images_it_did_not_learn_from():
    clean, poisoned = planted_data(192, seed=0), planted_data(64, seed=1, poisoned=True)
    anp = ANP(iterations=10, images=128, batch_size=64, trainer_options={"accelerator": "cpu", "progress": False})
    result = sweep_criterion(planted_net(), anp, clean, poisoned, max_accuracy_drop=5.0)
    assert len(result.scores.trained_on) == 128 and result.scores.budget["held_out"] == 64


def test_a_learned_criterion_that_would_see_every_clean_image_is_refused_before_it_trains():
    clean = planted_data(64, seed=0)
    anp = ANP(iterations=1, images=64, trainer_options={"accelerator": "cpu", "progress": False})
    with pytest.raises(BdpruningError, match="leaving none to judge the accuracy budget on"):
        sweep_criterion(planted_net(), anp, clean, max_accuracy_drop=5.0)
