"""Where and how Lightning runs a stage: one type for the options that the commands build and
the criteria, fine-tuning and evaluation read (importing it does not import Lightning)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping

from ..errors import BdpruningError

__all__ = ["TrainerOptions"]


@dataclass(frozen=True)
class TrainerOptions:
    """``accelerator``, ``devices`` and ``strategy`` go to
    :func:`~bdpruning.lightning_modules.evaluation.make_trainer`; ``progress`` shows a bar per
    stage (None: when stderr is a terminal); ``verbose`` shows Lightning's own messages."""

    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    progress: bool | None = None
    verbose: bool = False

    @classmethod
    def of(cls, value: TrainerOptions | Mapping | None) -> TrainerOptions:
        """``value`` as options: given ones, a mapping of their fields (the API's dicts), or None."""
        if isinstance(value, cls):
            return value
        value = dict(value or {})
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise BdpruningError(f"unknown trainer option(s) {', '.join(unknown)}; expected accelerator, devices, "
                                 "strategy, progress or verbose")
        return cls(**value)

    @property
    def one_process(self) -> bool:
        """Whether the stage runs in this process only (no data-parallel launch)."""
        return self.devices == 1 and self.strategy == "auto"

    def trainer_kwargs(self) -> dict:
        """The keyword arguments of ``make_trainer`` (the progress bar is the caller's)."""
        return {"accelerator": self.accelerator, "devices": self.devices, "strategy": self.strategy}

    def to_json(self) -> dict:
        """Where a run trained, as its record says: accelerator, devices, strategy."""
        return self.trainer_kwargs()
