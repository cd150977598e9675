"""The demo report's comparison of pruning defenses, from the stages' JSON files."""

from __future__ import annotations

import json

from bdpruning.demo.comparison import comparison_section


def _write(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _goodnet_row(model: str, clean: float, asr: float, detection: float, alarms: float) -> dict:
    return {"repaired": model, "clean_accuracy": clean, "attack_success_rate": asr, "detection_rate": detection,
            "false_alarm_rate": alarms}


def test_comparison_table_has_one_row_per_method(tmp_path):
    run = tmp_path
    _write(run / "pruning" / "summary.json", {"thresholds": [
        {"threshold": 2.0, "reached": True, "channels_pruned": 31, "model_dir": "repaired_2pct"}]})
    _write(run / "goodnet" / "goodnet.json", [_goodnet_row("pruning/repaired_2pct", 94.6, 72.0, 28.0, 3.2),
                                              _goodnet_row("finetuned", 92.4, 11.33, 88.67, 5.4)])
    _write(run / "goodnet_criteria" / "goodnet.json", [_goodnet_row("defense_clp/repaired_clp", 10.0, 100.0, 0.0, 90.0)])
    _write(run / "defense_clp" / "summary.json", {"chosen": {"channels_pruned": 2}})
    _write(run / "defense_clp" / "criterion.json", {"settings": {"u": 3.0, "data": None, "layers": ["conv_1"]}})
    _write(run / "defense_anp" / "summary.json", {"chosen": {"channels_pruned": 0}})  # chose nothing: no B'
    _write(run / "defense_anp" / "criterion.json", {"settings": {"iterations": 60, "data": "clean.h5"}})
    timings = {"prune": 10.0, "finetune": 20.0, "prune-clp": 5.0, "prune-anp": 60.0}
    text = "\n".join(comparison_section(run, timings))
    assert "| activation (lab), 2-point B' | 31 | 94.60 % | 72.00 % | 28.00 % | 3.20 % | 10 |" in text
    assert "| fine-pruning (that B' + fine-tuning) | 31 | 92.40 % | 11.33 % | 88.67 % | 5.40 % | 30 |" in text
    assert "| clp | 2 | 10.00 % | 100.00 % | 0.00 % | 90.00 % | 5 |" in text
    assert "| anp (chose no channel: B unchanged) | 0 | - | - | - | - | 60 |" in text and "- anp: iterations 60" in text
    assert (run / "comparison.png").stat().st_size > 1000 and "](comparison.png)" in text
