"""bdpruning: prune the channels that clean data leaves dormant to remove BadNet backdoors.

The public API reads like the task::

    model = bdpruning.load_model("bd_net.h5")
    ranking = bdpruning.rank_channels(model, clean_valid, layer="pool_3")
    bdpruning.prune_channels(model, layer="conv_3", channels=ranking.order[:45])
"""

from __future__ import annotations

import logging

from .data.hdf5 import H5ImageSet, read_h5_dataset
from .data.forms import ImageData, as_image_data
from .errors import BdpruningError
from .evaluation.goodnet import GoodNet
from .graph.layers import find_layer, layer_names
from .models.loading import load_model
from .criteria.activation import rank_channels
from .pruning.masks import plain_state_dict, prune_channels, pruned_channels, zeroed_channels
from .models.directory import save_model_dir
from .models import DeepID, ModelInfo, adopt, model_info
from .pruning.compaction import compact_model, model_cost
from .numerics.precision import precision_context
from .workflows.prune import save_defense, save_repaired
from .sweep.lab import SweepResult, run_sweep
from .criteria import ANP, CLP, RNP, MeanActivation
from .sweep.loop import run_defense, sweep_criterion
from .sweep.result import DefenseResult

__all__ = [
    "ANP",
    "CLP",
    "DefenseResult",
    "MeanActivation",
    "RNP",
    "run_defense",
    "sweep_criterion",
    "save_defense",
    "BdpruningError",
    "DeepID",
    "ModelInfo",
    "adopt",
    "GoodNet",
    "SweepResult",
    "compact_model",
    "H5ImageSet",
    "ImageData",
    "as_image_data",
    "find_layer",
    "layer_names",
    "load_model",
    "model_cost",
    "model_info",
    "plain_state_dict",
    "precision_context",
    "prune_channels",
    "zeroed_channels",
    "pruned_channels",  # the old name of zeroed_channels, kept for one release
    "rank_channels",
    "read_h5_dataset",
    "run_sweep",
    "save_model_dir",
    "save_repaired",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
