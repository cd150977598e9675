"""Old home of the shared sweep, kept importable for one release: use :mod:`bdpruning.sweep.loop`
(``sweep_criterion``, was ``run_defense``) and :mod:`bdpruning.sweep.result`."""

from .loop import defense_sweep, run_defense
from .result import DefenseResult, DefenseStep

__all__ = ["DefenseStep", "DefenseResult", "run_defense", "defense_sweep"]
