"""The demo's comparison of pruning defenses: the lab's criterion (and fine-pruning) against
CLP, ANP and RNP on the same BadNet, in one table and one plot.

The criteria run as ``bdprune prune --criterion ...`` stages, each held to the default
clean-accuracy budget (5 points, judged on the clean validation images it did not learn from:
ANP and RNP learn on 3/5 of them: 300 of the 500); their B' are evaluated on the test sets with GoodNet like
the lab's, and a criterion's own choice, where the budget capped it, is named beside it. ANP
runs with demo-sized settings (recorded here and in the report): the authors' 2,000 iterations
take far longer on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["DEMO_CRITERIA", "criterion_stages", "comparison_rows", "comparison_section"]

#: ``bdprune prune`` options of each criterion in the demo (beyond the data and output).
DEMO_CRITERIA: dict[str, list[str]] = {
    "clp": ["--criterion", "clp"],
    "anp": ["--criterion", "anp", "--iterations", "60", "--train-batch-size", "64"],
    # the authors' per-epoch stop overshoots on the demo's 0..255 digits: unlearning runs far past
    # chance and the masks overflow to NaN; stopping at the first batch at the stop accuracy does not
    "rnp": ["--criterion", "rnp", "--rnp-stop-per-batch"],
}
#: The criteria that learn from clean images; they learn on this share of the clean validation set,
#: so that the rest judges the clean-accuracy budget.
LEARNING_CRITERIA, LEARN_SHARE = ("anp", "rnp"), (3, 5)


def criterion_stages(
    clean_valid: str, poisoned_valid: str, precision: list[str], valid_images: int
) -> list[tuple[str, list[str]]]:
    """``(label, bdprune prune arguments)`` of each criterion; outputs go to ``defense_<name>``.
    ANP and RNP learn on 3/5 of the ``valid_images`` clean validation images (300 of the demo's 500)."""
    learn = ["--images", str(valid_images * LEARN_SHARE[0] // LEARN_SHARE[1])]
    return [(f"prune-{name}",
             ["--model", "converted", "--clean-valid", clean_valid, "--poisoned-valid", poisoned_valid,
              "--out", f"defense_{name}", *options, *(learn if name in LEARNING_CRITERIA else []),
              "--no-progress", *precision])
            for name, options in DEMO_CRITERIA.items()]


def _goodnet_rows(*paths: Path) -> dict[str, dict]:
    rows = {}
    for path in paths:
        if path.exists():
            rows.update({row["repaired"]: row for row in json.loads(path.read_text())})
    return rows


def comparison_rows(run: Path, timings: dict[str, float]) -> list[dict]:
    """One row per method: channels pruned, the B' clean accuracy and ASR on the test sets,
    GoodNet's detection and false alarms with it, and the wall time of its stages."""
    goodnet = _goodnet_rows(run / "goodnet" / "goodnet.json", run / "goodnet_criteria" / "goodnet.json")
    summary = json.loads((run / "pruning" / "summary.json").read_text())
    rows = []
    first = next((t for t in summary["thresholds"] if t["reached"]), None)
    if first is not None:
        model = f"pruning/{first['model_dir']}"
        rows.append(("activation (lab), " + f"{first['threshold']:g}-point B'", first["channels_pruned"], model,
                     timings.get("prune", 0.0)))
        if "finetuned" in goodnet:
            rows.append(("fine-pruning (that B' + fine-tuning)", first["channels_pruned"], "finetuned",
                         timings.get("prune", 0.0) + timings.get("finetune", 0.0)))
    for name in DEMO_CRITERIA:
        path = run / f"defense_{name}" / "summary.json"
        if path.exists():
            summary = json.loads(path.read_text())
            chosen, budget = summary["chosen"], summary.get("budget")
            label = name if chosen["channels_pruned"] else f"{name} (chose no channel: B unchanged)"
            if budget and budget["raw"] != budget["step"]:
                label += (f" (within the {budget['max_drop']:g}-point budget; its own choice, {budget['raw']} "
                          f"channels, left {budget['raw_clean_accuracy']:.1f} % clean accuracy on the validation set)")
            rows.append((label, chosen["channels_pruned"], f"defense_{name}/repaired_{name}",
                         timings.get(f"prune-{name}", 0.0)))
    table = []
    for method, channels, model, seconds in rows:
        row = goodnet.get(model, {})
        table.append({"method": method, "channels_pruned": channels, "model": model,
                      "clean_accuracy": row.get("clean_accuracy"), "attack_success_rate": row.get("attack_success_rate"),
                      "detection_rate": row.get("detection_rate"), "false_alarm_rate": row.get("false_alarm_rate"),
                      "seconds": seconds})
    return table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} %"


def comparison_section(run: Path, timings: dict[str, float]) -> list[str]:
    """The report's comparison: the table, the plot (written here) and the criteria's settings."""
    from ..plots import plot_tradeoff

    rows = comparison_rows(run, timings)
    if not rows:
        return []
    plotted = [r for r in rows if r["clean_accuracy"] is not None]
    if plotted:
        plot_tradeoff(plotted, run / "comparison.png")
    settings = []
    for name in DEMO_CRITERIA:
        path = run / f"defense_{name}" / "criterion.json"
        if path.exists():
            record = json.loads(path.read_text())
            shown = {k: v for k, v in record["settings"].items()
                     if k not in ("data", "layers", "mode", "count", "devices", "strategy") and v is not None}
            settings.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    return [
        "## Pruning defenses compared (test sets)",
        "",
        "Each criterion chose its channels on the clean validation set only (the poisoned set only gives the ASR); "
        "ANP and RNP cover every conv layer, CLP (as its authors) the convs followed by a BatchNorm; each is held to "
        "the clean-accuracy budget. B' clean accuracy and ASR, and GoodNet with that B', on the "
        "clean and poisoned test sets. Seconds: wall time of the method's `bdprune` stages (loading, choosing, "
        "sweeping, saving; fine-pruning adds fine-tuning).",
        "",
        "| method | channels pruned | clean accuracy | ASR | GoodNet detection | false alarms | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[f"| {r['method']} | {r['channels_pruned']} | {_pct(r['clean_accuracy'])} | {_pct(r['attack_success_rate'])} "
          f"| {_pct(r['detection_rate'])} | {_pct(r['false_alarm_rate'])} | {r['seconds']:.0f} |" for r in rows],
        "",
        *(["![clean accuracy vs ASR per method](comparison.png)", ""] if plotted else []),
        "Settings (ANP and RNP demo-sized where they differ from the authors' defaults: ANP 2,000 iterations "
        "of batch 128; RNP stops unlearning per epoch, which on these digits overflows the masks):",
        "",
        *settings,
        "",
    ]
