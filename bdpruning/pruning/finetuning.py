"""Fine-pruning: fine-tune a repaired model B' on clean data with its pruned channels held at zero.

The pieces here work without Lightning: the loss by the model's output contract, the optimizer,
freezing the pruned channels with masks (:func:`keep_pruned_at_zero`) and the per-epoch history; a
run's directory is written by :func:`bdpruning.workflows.finetune.save_finetune_run`. The
training loop itself is :func:`bdpruning.lightning_modules.finetune.finetune_model`::

    from bdpruning.lightning_modules.finetune import finetune_model
    result = finetune_model(load_model("repaired_4pct"), "clean_valid.h5", epochs=5,
                            poisoned_eval="poisoned_valid.h5")
    save_finetune_run(result, "runs/finetune")     # a model directory plus finetune.json/csv/png
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BdpruningError
from .masks import masked_channels, prune_channels, pruned_selection
from ..evaluation.metrics import EVALUATION_COUNTS, EvaluationResult
from ..models import model_info
from ..models.outputs import logits_model

__all__ = [
    "OPTIMIZERS",
    "DEFAULT_LR",
    "FinetuneResult",
    "log_probabilities",
    "finetune_loss",
    "make_optimizer",
    "check_finetune_settings",
    "keep_pruned_at_zero",
    "EpochRecord",
    "history_rows",
    "HISTORY_COLUMNS",
]

#: Optimizers :func:`make_optimizer` builds (SGD with momentum 0.9).
OPTIMIZERS = ("adam", "sgd")
#: Learning rate per optimizer used when none is given.
DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-3}

#: The layer the lab prunes in DeepID (its last conv), for a DeepID B' without masks.
DEEPID_PRUNED_LAYER = "conv_3"

#: Columns of ``finetune.csv``.
HISTORY_COLUMNS = ("epoch", "train_loss", "clean_accuracy", "attack_success_rate") + EVALUATION_COUNTS


def log_probabilities(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Log class probabilities of ``model`` on ``images``, for training, by its output contract.

    A model that returns logits (``ModelInfo.outputs``, see :func:`bdpruning.adopt`) gets
    ``log_softmax``. For a model that ends in softmax (DeepID, a graph ending in ``Softmax``) the logits
    under the softmax are taken from its graph (:func:`bdpruning.models.outputs.logits_model`), so the
    result is exact and always has a gradient: in float32 a confident softmax saturates and the
    true class's probability can underflow. Only where no softmax is found in the graph is it
    ``log(probabilities)`` clamped at 1e-12.
    """
    if model_info(model).outputs == "logits":
        return F.log_softmax(model(images), dim=1)
    logits = _logits_of(model)
    if logits is None:
        return torch.log(model(images).clamp_min(1e-12))
    return F.log_softmax(logits(images), dim=1)


def _logits_of(model: nn.Module) -> nn.Module | None:
    """:func:`~bdpruning.models.outputs.logits_model`, traced once per model (it shares the weights)."""
    if model not in _LOGITS:
        _LOGITS[model] = logits_model(model)
    return _LOGITS[model]


_LOGITS: "weakref.WeakKeyDictionary[nn.Module, nn.Module | None]" = weakref.WeakKeyDictionary()


def finetune_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of ``labels`` (cross-entropy), see :func:`log_probabilities`."""
    return F.nll_loss(log_probabilities(model, images), labels)


def make_optimizer(parameters: Iterable[nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer:
    """Adam, or SGD with momentum 0.9."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    raise BdpruningError(f"unknown optimizer {name!r} (use {' or '.join(OPTIMIZERS)})")


def check_finetune_settings(epochs: int, lr: float | None, batch_size: int, optimizer: str) -> float:
    """Refuse settings that cannot train (epochs < 1, a learning rate that is not > 0, ...); return
    the learning rate to use: ``lr``, or the optimizer's :data:`DEFAULT_LR` when it is None."""
    if optimizer not in OPTIMIZERS:
        raise BdpruningError(f"unknown optimizer {optimizer!r} (use {' or '.join(OPTIMIZERS)})")
    if lr is None:
        lr = DEFAULT_LR[optimizer]
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise BdpruningError(f"--epochs must be an integer of at least 1 (got {epochs!r})")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise BdpruningError(f"--lr must be a finite number above 0 (got {lr!r})")
    if batch_size < 1:
        raise BdpruningError(f"--batch-size must be at least 1 (got {batch_size})")
    return lr


def keep_pruned_at_zero(model: nn.Module, layer: str | None = None) -> dict[str, list[int]]:
    """Make sure training cannot bring pruned channels back; return ``{layer: channels}``.

    A model with pruning masks keeps them (see :mod:`bdpruning.pruning.masks`; a saved B' has
    them in its record). A model without masks (a B' from a Keras file, whose pruned channels
    are only zeroed) gets masks on the all-zero channels of ``layer``: by default DeepID's last
    conv ``conv_3`` for a DeepID; any other model without masks must name it. Refuses a model with
    nothing pruned.
    """
    if layer is None and not any(masked_channels(model).values()):
        if model_info(model).architecture != "deepid":
            raise BdpruningError("the model has no pruning masks: name the layer whose all-zero channels are the "
                                 "pruned ones (layer=..., --layer)")
        layer = DEEPID_PRUNED_LAYER
    pruned = pruned_selection(model, layer or DEEPID_PRUNED_LAYER)
    if not any(masked_channels(model).values()):
        for name, channels in pruned.items():
            prune_channels(model, name, channels)
    return pruned


@dataclass(frozen=True)
class EpochRecord:
    """One row of a fine-tuning history: the epoch (0: before fine-tuning), its mean train loss
    (None before), and the evaluation after it."""

    epoch: int
    train_loss: float | None
    evaluation: EvaluationResult

    @property
    def clean_accuracy(self) -> float | None:
        return self.evaluation.clean_accuracy

    @property
    def attack_success_rate(self) -> float | None:
        return self.evaluation.attack_success_rate

    def to_json(self) -> dict:
        """A row of ``finetune.json`` and ``finetune.csv`` (:data:`HISTORY_COLUMNS`)."""
        return {"epoch": self.epoch, "train_loss": self.train_loss, **self.evaluation.rates(),
                **self.evaluation.counts()}

    def __getitem__(self, key: str):
        """The JSON row's ``key`` (``row["clean_accuracy"]``): history rows were dicts; kept for one release."""
        return self.to_json()[key]


def history_rows(counts: torch.Tensor, train_loss: torch.Tensor) -> list[EpochRecord]:
    """One row per epoch (0 = before fine-tuning) from the per-epoch counts and mean train loss.

    ``counts`` is (epochs + 1, len(EVALUATION_COUNTS)) in that order; ``train_loss`` holds NaN
    for epoch 0. Rates are in percent, None where a set is absent.
    """
    return [EpochRecord(epoch, None if math.isnan(loss) else loss,
                        EvaluationResult.of(dict(zip(EVALUATION_COUNTS, (int(v) for v in row)))))
            for epoch, (row, loss) in enumerate(zip(counts.tolist(), train_loss.tolist()))]


@dataclass
class FinetuneResult:
    """A fine-tuned model, its pruned channels and the evaluation before and after every epoch."""

    model: nn.Module
    pruned: dict[str, list[int]]
    history: list[EpochRecord]  # history[0] is before fine-tuning
    settings: dict
    sets: dict[str, str | None]  # train, clean_eval, poisoned_eval
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def before(self) -> EpochRecord:
        return self.history[0]

    @property
    def after(self) -> EpochRecord:
        return self.history[-1]

    def summary(self) -> dict:
        """Everything but the model, as JSON-ready data (``finetune.json``)."""
        return {**self.extra, "settings": self.settings, "sets": self.sets, "pruned": self.pruned,
                "seconds": self.seconds, "before": self.before.to_json(), "after": self.after.to_json(),
                "history": [row.to_json() for row in self.history]}


