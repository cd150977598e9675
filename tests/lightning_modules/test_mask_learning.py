"""The learned criteria's Lightning wiring: one progress bar per stage in the user's units,
nothing from Lightning on the console, iteration counts as given, batches gathered at once."""

from __future__ import annotations

import logging

import torch

from bdpruning.criteria import ANP, RNP
from bdpruning.lightning_modules.mask_learning import TensorBatches, clean_training_data
from helpers.planted import planted_data, planted_net


def test_anp_shows_one_bar_in_iterations_and_nothing_from_lightning(capfd, caplog):
    with caplog.at_level(logging.INFO):
        scores = ANP(iterations=7, images=64, batch_size=16,
                     trainer_options={"accelerator": "cpu", "progress": True}).score(planted_net(), planted_data(64, 0))
    out, err = capfd.readouterr()
    assert "ANP (7 iterations)" in err and "/7 " in err  # the bar counts iterations (redraws depend on time)
    assert scores.settings["iterations_run"] == 7 and "ANP: 7 iterations" in caplog.text
    for noise in ("GPU available", "Tip", "max_steps", "PossibleUserWarning", "LOCAL_RANK"):
        assert noise not in out + err + caplog.text


def test_rnp_counts_its_stages_in_epochs(capfd):
    RNP(images=64, batch_size=32, unlearn_epochs=2, recover_epochs=3,
        trainer_options={"accelerator": "cpu", "progress": True}).score(planted_net(), planted_data(64, 0))
    err = capfd.readouterr().err
    assert "RNP recovering" in err and "/3 " in err and "RNP unlearning" in err and "epoch" in err


def test_training_images_are_a_seeded_subset_gathered_batch_by_batch():
    images, labels = planted_data(40, 0)
    data = clean_training_data(planted_net(), (images, labels), 24, 8, seed=3)
    again = clean_training_data(planted_net(), (images, labels), 24, 8, seed=3)
    assert data.indices == again.indices and len(data.indices) == 24 == len(set(data.indices))
    assert torch.equal(data.train_set.images, images[data.indices])
    batch = data.train_set.__getitems__([3, 0, 5])
    assert torch.equal(batch[0], images[[data.indices[3], data.indices[0], data.indices[5]]])
    assert isinstance(data.train_set, TensorBatches)
