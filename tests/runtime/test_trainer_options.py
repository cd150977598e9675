"""Trainer options as one type: built by the commands, read by the criteria, fine-tuning and the
prune stage, recorded as accelerator, devices and strategy."""

from __future__ import annotations

import argparse

import pytest

from bdpruning import BdpruningError
from bdpruning.commands import evaluate
from bdpruning.commands.options import lightning_options, trainer_options
from bdpruning.criteria import ANP
from bdpruning.runtime.trainer_options import TrainerOptions


def test_a_dict_of_its_fields_is_the_same_options_and_anything_else_is_named():
    options = TrainerOptions.of({"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"})
    assert options == TrainerOptions("cpu", 2, "ddp_spawn") and not options.one_process
    assert TrainerOptions.of(None) == TrainerOptions() and TrainerOptions().one_process
    assert options.to_json() == {"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}
    with pytest.raises(BdpruningError, match="unknown trainer option.*gpus"):
        TrainerOptions.of({"gpus": 2})
    with pytest.raises(BdpruningError, match="unknown trainer option"):
        ANP(trainer_options={"accelerater": "cpu"})._data_device()


def test_the_commands_build_them_from_their_arguments():
    parser = argparse.ArgumentParser()
    parser.add_argument("-v", "--verbose", action="store_true")
    evaluate.add_arguments(parser)
    args = parser.parse_args(["--model", "m.h5", "--clean", "c.h5", "--accelerator", "cpu", "--devices", "2",
                              "--strategy", "ddp"])
    assert trainer_options(args, verbose=True) == TrainerOptions("cpu", 2, "ddp", verbose=True)
    assert {k: lightning_options(args)[k] for k in ("accelerator", "devices", "strategy")} == \
        trainer_options(args).trainer_kwargs()
