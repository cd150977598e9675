"""The fine-pruning stage's output: a fine-tuned B' written as a model directory with its history.

The training itself is :func:`bdpruning.lightning_modules.finetune.finetune_model`; the pieces it
uses are in :mod:`bdpruning.pruning.finetuning`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..runtime.atomic import atomic_dir, prepare_out_dir, write_json
from ..pruning.finetuning import HISTORY_COLUMNS, FinetuneResult
from ..models.keras_h5 import write_keras_copy
from ..models.directory import write_model_files
from .writers import write_rows_csv

__all__ = ["save_finetune_run"]


def save_finetune_run(result: FinetuneResult, out: str | os.PathLike[str], force: bool = False) -> Path:
    """Write ``out`` atomically: the fine-tuned model as a bdpruning model directory (so
    ``load_model(out)`` and ``bdprune goodnet --repaired out`` take it) plus ``finetune.json``,
    ``finetune.csv`` and ``finetune.png`` (clean accuracy and ASR per epoch), and ``model.h5``
    when the model came from a DeepID Keras file (its layout, pruned channels zeroed).

    Raises :class:`~bdpruning.BdpruningError` when ``out`` exists (unless ``force``).
    """
    from ..plots import plot_finetune

    out = prepare_out_dir(out, force)
    summary = result.summary()
    record = {key: summary[key] for key in (*result.extra, "settings", "sets")}
    record.update(before=result.before.evaluation.rates(), after=result.after.evaluation.rates())
    with atomic_dir(out) as directory:
        write_model_files(result.model, directory, extra={"finetuned": record})
        write_json(directory / "finetune.json", summary)
        write_rows_csv(summary["history"], directory / "finetune.csv", list(HISTORY_COLUMNS))
        plot_finetune(summary["history"], directory / "finetune.png")
        write_keras_copy(result.model, directory / "model.h5")
    return out
