"""Old home of the criteria's prune stage, kept importable for one release: use
:mod:`bdpruning.workflows.prune` (``prune_stage``) and :mod:`bdpruning.workflows.writers`."""

from .prune import defend_model, save_defense
from .summary import chosen_dirname
from .writers import save_defense_models, write_defense_results

__all__ = ["chosen_dirname", "defend_model", "save_defense", "write_defense_results", "save_defense_models"]
