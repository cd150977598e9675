"""Pruning criteria: small objects that score channels (or learn masks over them), kept apart
from the act of pruning, as Torch-Pruning keeps importance apart from its pruner.

Each has ``score(model, clean) -> ChannelScores`` and never sees poisoned data; the sweep,
thresholds, saving B', fine-tuning, compaction and GoodNet are shared
(:func:`bdpruning.sweep.defense.run_defense`)::

    from bdpruning.criteria import CLP, ANP, RNP, MeanActivation
    scores = CLP(u=3).score(model)                 # data-free
    scores = ANP(iterations=300).score(model, clean_valid)
    scores.selection()                             # {"conv_2": [5, 11], "conv_3": [17]}
"""

from __future__ import annotations

from .activation import MeanActivation
from .anp import ANP
from .base import ChannelScores, Criterion
from .clp import CLP
from .rnp import RNP

__all__ = ["ANP", "CLP", "CRITERIA", "ChannelScores", "Criterion", "MeanActivation", "RNP"]

#: The criteria by their command-line names.
CRITERIA = {"activation": MeanActivation, "clp": CLP, "anp": ANP, "rnp": RNP}
