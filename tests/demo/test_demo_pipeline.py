"""End to end on a reduced demo: build -> convert -> prune -> fine-prune -> compact -> GoodNet -> report.md."""

from __future__ import annotations

import json

import pytest

from bdpruning.demo.pipeline import run_demo


@pytest.mark.tensorflow
@pytest.mark.slow
def test_reduced_demo_runs_the_whole_pipeline(tmp_path):
    small = {"epochs": 3, "train_per_class": 100, "valid_per_class": 10, "test_per_class": 10}  # learns: above chance
    report = run_demo(tmp_path / "run", tmp_path / "cache", thresholds=(2, 4), finetune_epochs=2, build_options=small)
    run = tmp_path / "run"
    assert report == run / "report.md"
    text = report.read_text()
    for heading in ("## Conversion", "## Pruning", "## GoodNet", "## Reproduce"):
        assert heading in text
    assert "**the numbers below will differ from the README's**" in text  # a reduced build trains its BadNet
    conversion = json.loads((run / "converted" / "conversion.json").read_text())
    assert conversion["passed"] and conversion["inputs"]["kind"] == "real"
    summary = json.loads((run / "pruning" / "summary.json").read_text())
    reached = [t for t in summary["thresholds"] if t["reached"]]
    assert reached, "a small BadNet still loses accuracy when its channels go"
    for entry in reached:
        assert (run / "pruning" / entry["model_dir"] / "model.safetensors").exists()
        assert f"| {entry['threshold']:g} pts | {entry['channels_pruned']} |" in text
    compaction = json.loads((run / "compact" / "compaction.json").read_text())
    assert compaction["passed"] and compaction["max_abs_diff"] <= 1e-5 and compaction["argmax_agreement"] == 1
    assert compaction["after"]["flops"] < compaction["before"]["flops"] and "## Compaction" in text
    assert compaction["source"] == "finetuned"  # the deployable model: fine-pruned, then compacted
    finetuned = json.loads((run / "finetuned" / "finetune.json").read_text())
    assert finetuned["model"] == f"pruning/{reached[0]['model_dir']}" and len(finetuned["history"]) == 3
    assert finetuned["pruned"]["conv_3"] == sorted(reached[0]["pruned_channels"]) and "## Fine-pruning" in text
    assert f"| after 2 epochs | {finetuned['after']['clean_accuracy']:.2f} % |" in text
    rows = json.loads((run / "goodnet" / "goodnet.json").read_text())
    assert [row["repaired"] for row in rows] == [*(f"pruning/{t['model_dir']}" for t in reached), "finetuned"]
    for figure in ("pruning/accuracy_asr.png", "pruning/activations.png", "finetuned/finetune.png",
                   "goodnet/goodnet.png"):
        assert (run / figure).stat().st_size > 1000 and f"]({figure})" in text
    for name in ("clp", "anp", "rnp"):  # the other criteria ran on the same BadNet
        assert json.loads((run / f"defense_{name}" / "criterion.json").read_text())["criterion"] == name
    assert "## Pruning defenses compared" in text and "| clp" in text
    # the build is cached: a second run reuses it and replaces the run directory
    run_demo(tmp_path / "run", tmp_path / "cache", thresholds=(2, 4), finetune_epochs=2, build_options=small)
    assert json.loads((run / "pruning" / "summary.json").read_text()) == summary


def test_bad_finetune_epochs_are_refused_before_the_build(tmp_path, capsys):
    from bdpruning.cli import main

    code = main(["demo", "--finetune-epochs", "0", "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and err == "bdprune demo: error: --finetune-epochs must be at least 1 (got 0)\n"
    assert list(tmp_path.iterdir()) == []  # no cache built, no run directory
