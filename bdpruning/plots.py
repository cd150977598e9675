"""All of bdpruning's plots (matplotlib, PNG). The core never imports this module's backend."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_sweep", "plot_activations", "plot_goodnet", "plot_finetune", "plot_scores", "plot_tradeoff"]


def _save(fig: "plt.Figure", path: str | os.PathLike[str]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_rates(ax: "plt.Axes", x: Sequence[float], clean_accuracy: Sequence[float],
                attack_success_rate: Sequence[float] | None, marker: str) -> None:
    """Clean accuracy and (when given) ASR in percent against ``x``, on a 0..100 axis."""
    ax.plot(x, clean_accuracy, marker=marker, label="clean accuracy")
    if attack_success_rate is not None:
        ax.plot(x, attack_success_rate, marker=marker, color="tab:red", label="attack success rate")
    ax.set_ylabel("percent")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)


def plot_sweep(
    fractions: Sequence[float],
    clean_accuracy: Sequence[float],
    attack_success_rate: Sequence[float] | None,
    thresholds: Sequence[tuple[float, float | None]],
    path: str | os.PathLike[str],
    layer: str = "conv_3",
    marks: Sequence[tuple[str, float]] = (),
) -> None:
    """Clean accuracy and ASR (percent) vs fraction of channels pruned; thresholds marked.

    ``thresholds`` holds ``(T, fraction where B'_T was taken or None)``; ``marks`` more labelled
    fractions (a criterion's own choice).
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _plot_rates(ax, [100 * f for f in fractions], clean_accuracy, attack_success_rate, marker=".")
    at: dict[float, list[float]] = {}
    for threshold, fraction in thresholds:
        if fraction is not None:
            at.setdefault(fraction, []).append(threshold)
    for fraction, reached in at.items():  # one step can cross several thresholds
        ax.axvline(100 * fraction, color="grey", linestyle="--", linewidth=0.8)
        label = "/".join(f"-{t:g}" for t in reached) + " pts"
        ax.annotate(label, (100 * fraction, 2), rotation=90, fontsize=8, color="grey",
                    xytext=(3, 0), textcoords="offset points")
    for label, fraction in marks:
        ax.axvline(100 * fraction, color="tab:green", linestyle=":", linewidth=1.2)
        ax.annotate(label, (100 * fraction, 60), rotation=90, fontsize=8, color="tab:green",
                    xytext=(3, 0), textcoords="offset points")
    ax.set_xlabel(f"channels of {layer} pruned (%)")
    ax.set_title("Pruning sweep")
    ax.legend(loc="lower left")
    _save(fig, path)


def plot_activations(
    order: Sequence[int], mean_activation: Sequence[float], path: str | os.PathLike[str], layer: str = "pool_3"
) -> None:
    """Per-channel mean activation of ``layer``, in pruning order (first pruned on the left)."""
    fig, ax = plt.subplots(figsize=(max(6, len(order) * 0.12), 4))
    ax.bar(range(len(order)), [mean_activation[c] for c in order], color="tab:blue")
    step = max(1, len(order) // 30)
    ax.set_xticks(range(0, len(order), step), [str(order[i]) for i in range(0, len(order), step)],
                  rotation=90, fontsize=7)
    ax.set_xlabel("channel (in pruning order)")
    ax.set_ylabel("mean activation on clean data")
    ax.set_title(f"{layer}: mean activation per channel")
    _save(fig, path)


def plot_goodnet(rows: Sequence[dict], path: str | os.PathLike[str]) -> None:
    """Bars per repaired model B': clean accuracy and attack success rate (percent).

    ``rows`` are ``bdprune goodnet``'s rows (keys ``repaired``, ``clean_accuracy``,
    ``attack_success_rate``); a missing rate (no poisoned set) is drawn as 0.
    """
    names = [os.path.basename(os.path.normpath(str(row["repaired"]))) for row in rows]
    x = range(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows) + 2), 4.5))
    for offset, key, label, color in ((-width / 2, "clean_accuracy", "clean accuracy", "tab:blue"),
                                      (width / 2, "attack_success_rate", "attack success rate", "tab:red")):
        values = [row[key] or 0.0 for row in rows]
        bars = ax.bar([i + offset for i in x], values, width, label=label, color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(list(x), names, rotation=15 if len(rows) > 3 else 0)
    ax.set_ylabel("percent")
    ax.set_ylim(0, 110)
    ax.set_title("Repaired models B' (GoodNet's second net)")
    ax.legend(loc="upper right")
    _save(fig, path)


def plot_finetune(history: Sequence[dict], path: str | os.PathLike[str]) -> None:
    """Clean accuracy and attack success rate (percent) per fine-tuning epoch (0 = before).

    ``history`` holds rows with ``epoch``, ``clean_accuracy`` and ``attack_success_rate`` (None
    without a poisoned set: that line is left out).
    """
    epochs = [row["epoch"] for row in history]
    asr = [row["attack_success_rate"] for row in history]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _plot_rates(ax, epochs, [row["clean_accuracy"] for row in history],
                asr if all(value is not None for value in asr) else None, marker="o")
    ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 20)])
    ax.set_xlabel("epoch of fine-tuning (0 = repaired model before)")
    ax.set_title("Fine-pruning: the repaired model fine-tuned on clean data")
    ax.legend(loc="center right")
    _save(fig, path)


def plot_scores(order: Sequence[tuple[str, int]], scores: dict[str, Sequence[float]], path: str | os.PathLike[str],
                title: str, selected: int) -> None:
    """A criterion's score per channel in pruning order (first pruned on the left), one colour
    per layer; the channels the criterion chose are left of the dashed line."""
    fig, ax = plt.subplots(figsize=(max(6, min(len(order) * 0.06, 24)), 4))
    layers = list(scores)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, layer in enumerate(layers):
        xs = [i for i, (name, _) in enumerate(order) if name == layer]
        ax.bar(xs, [scores[layer][order[i][1]] for i in xs], width=1.0, color=colours[index % len(colours)],
               label=layer)
    if selected:
        ax.axvline(selected - 0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("channel, in pruning order")
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_tradeoff(rows: Sequence[dict], path: str | os.PathLike[str]) -> None:
    """Clean accuracy against ASR (percent), one point per method (``rows``: ``method``,
    ``clean_accuracy``, ``attack_success_rate``); up and to the left is better."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        ax.scatter(row["attack_success_rate"], row["clean_accuracy"], s=40)
        right = row["attack_success_rate"] > 50  # labels stay inside the axes
        ax.annotate(row["method"], (row["attack_success_rate"], row["clean_accuracy"]), fontsize=8,
                    xytext=(-4 if right else 4, 4), textcoords="offset points", ha="right" if right else "left")
    ax.set_xlabel("attack success rate (%)")
    ax.set_ylabel("clean accuracy (%)")
    ax.set_xlim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title("Defenses: clean accuracy vs attack success rate")
    _save(fig, path)
