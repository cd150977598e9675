"""The evaluation stages: one model's clean accuracy and attack success rate (``evaluate``), and
GoodNet(B, B') for each repaired model B' (``goodnet``: JSON rows and the Lab-3 plot).

With a ``device`` the stage runs in this one process without Lightning (importing it costs more
than evaluating, see :mod:`bdpruning.evaluation.local_counts`); with ``device=None`` it runs
Lightning with ``options`` (data-parallel where they say so) and returns None in the extra
processes of the ``ddp`` launcher: the first one writes and reports.
"""

from __future__ import annotations

import os

from torch import nn

from ..models import model_info
from ..models.loading import load_model
from ..numerics.precision import precision_record
from ..runtime.atomic import atomic_dir, prepare_out_dir, write_json

__all__ = ["evaluate_stage", "goodnet_stage"]


def _load(path: str, device: str | None, model_options: dict) -> nn.Module:
    if device is None:  # Lightning moves the model to its processes' devices
        return load_model(path, device="cpu", **model_options)
    from ..runtime.devices import resolve_device

    return load_model(path, device=resolve_device(device), **model_options)


def evaluate_stage(model: str, clean: str, poisoned: str | None, *, device: str | None, options: dict,
                   model_options: dict, out: str | os.PathLike[str] | None = None) -> dict | None:
    """Evaluate the model at ``model`` on ``clean`` (and ``poisoned``); the results (counts, rates
    and the precision record) as written to the JSON file ``out``, if given."""
    net = _load(model, device, model_options)
    if device is not None:
        from ..evaluation.local_counts import count_evaluation

        counts = count_evaluation(net, clean, poisoned, batch_size=options["batch_size"], tf32=options["tf32"])
    else:
        from ..lightning_modules.evaluation import evaluate_model

        counts = evaluate_model(net, clean, poisoned, **options)
    if counts is None:
        return None
    results = {"model": model, "clean": clean, "poisoned": poisoned, **counts.to_json(),
               "precision": precision_record(options["tf32"])}
    if out:
        write_json(out, results)
    return results


def goodnet_stage(bd: str, repaired: list[str], clean: str, poisoned: str, out: str | os.PathLike[str], *,
                  force: bool = False, device: str | None, options: dict, model_options: dict) -> list[dict] | None:
    """GoodNet(B, B') for each model in ``repaired``: one row of rates per B', written to the
    output directory ``out`` (refused if it exists, unless ``force``) as ``goodnet.json`` and
    ``goodnet.png``."""
    from ..plots import plot_goodnet

    out = prepare_out_dir(out, force)
    bd_net = _load(bd, device, model_options)
    repaired_nets = [_load(path, device, model_options) for path in repaired]
    if device is not None:
        from ..evaluation.local_counts import count_goodnets

        rates = count_goodnets(bd_net, repaired_nets, clean, poisoned, batch_size=options["batch_size"],
                               tf32=options["tf32"])
    else:
        from ..lightning_modules.goodnet import evaluate_goodnets

        rates = evaluate_goodnets(bd_net, repaired_nets, clean, poisoned, **options)
    if rates is None:
        return None
    num_classes = model_info(bd_net).num_classes
    rows = [{"repaired": path, "num_classes": num_classes, **row.to_json()} for path, row in zip(repaired, rates)]
    with atomic_dir(out) as directory:
        write_json(directory / "goodnet.json", rows)
        plot_goodnet(rows, directory / "goodnet.png")
    return rows
