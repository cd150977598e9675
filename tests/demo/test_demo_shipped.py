"""The shipped demo BadNet: the default build uses it without training, and its pruning table is
exactly the one the README quotes, on any machine (the float32 result is shown not to depend on
round-off)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bdpruning import BdpruningError, find_layer, load_model, read_h5_dataset
from bdpruning.demo import MANIFEST, MODEL_FILE, build, build_demo
from bdpruning.demo.report import _provenance
from bdpruning.numerics.roundoff import Reference, accumulation_depth
from bdpruning.graph.split import split_at
from bdpruning.sweep.lab import SweepResult, run_sweep
from helpers.material import ROOT

README = ROOT / "README.md"
TABLE_HEADER = "| threshold | channels pruned | clean accuracy | ASR |"
THRESHOLDS = (2.0, 4.0, 10.0, 20.0)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _no_training(*args, **kwargs):
    pytest.fail("the default demo build trained a BadNet instead of using the shipped one")


@pytest.fixture(scope="module")
def shipped_demo(tmp_path_factory):
    """The default build (data generated deterministically, the shipped BadNet): no training."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build, "_train_and_check", _no_training)
        return build_demo(tmp_path_factory.mktemp("shipped") / "demo")


def test_default_build_uses_the_shipped_model(shipped_demo):
    manifest = json.loads((shipped_demo.directory / MANIFEST).read_text())
    digest = _sha256(build.SHIPPED_MODEL)
    assert manifest["model"] == {"source": "shipped", "file": "data/demo_bd_net.h5", "sha256": digest}
    assert manifest["parameters"]["model"] == "shipped" and manifest["files"][MODEL_FILE] == digest
    assert shipped_demo.bd_net.read_bytes() == build.SHIPPED_MODEL.read_bytes()
    assert shipped_demo.shipped_model and shipped_demo.model_sha256 == digest
    assert shipped_demo.num_classes == 10 and shipped_demo.attack_success_rate == 1.0
    assert "these are the README's numbers" in _provenance(shipped_demo)
    with pytest.MonkeyPatch.context() as patch:  # a second call reuses the directory
        patch.setattr(build, "_copy_shipped", lambda *a: pytest.fail("the cached demo was rebuilt"))
        assert build_demo(shipped_demo.directory) == shipped_demo


def test_rebuild_trains_even_with_the_default_parameters(tmp_path, monkeypatch):
    trained = []

    def fake_train(directory, data, num_classes, epochs, seed):  # stands in for Keras
        trained.append((epochs, seed))
        (directory / MODEL_FILE).write_bytes(b"retrained")
        return {"clean_accuracy": 0.5, "attack_success_rate": 0.5}

    monkeypatch.setattr(build, "_train_and_check", fake_train)
    rebuilt = build_demo(tmp_path / "demo", rebuild=True)
    manifest = json.loads((tmp_path / "demo" / MANIFEST).read_text())
    assert trained == [(8, 0)] and rebuilt.model_source == "trained" and not rebuilt.shipped_model
    assert manifest["model"] == {"source": "trained", "sha256": _sha256(rebuilt.bd_net)}
    assert "will differ from the README's" in _provenance(rebuilt)
    assert build_demo(tmp_path / "demo", rebuild=True).model_source == "trained" and len(trained) == 2
    monkeypatch.setattr(build, "_train_and_check", _no_training)
    back = build_demo(tmp_path / "demo")  # without --rebuild: back to the shipped model
    assert back.shipped_model and back.bd_net.read_bytes() == build.SHIPPED_MODEL.read_bytes()


def test_demo_command_rebuilds_only_when_asked(tmp_path, monkeypatch):
    from bdpruning.cli import main
    from bdpruning.demo import pipeline

    builds = []

    def fake_run_demo(out, cache, **options):
        builds.append(options["build_options"])
        return tmp_path / "report.md"

    monkeypatch.setattr(pipeline, "run_demo", fake_run_demo)
    for flags in ([], ["--rebuild"]):
        assert main(["demo", "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"), *flags]) == 0
    assert builds == [{"seed": 0, "rebuild": False}, {"seed": 0, "rebuild": True}]


def test_a_changed_shipped_model_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "demo_bd_net.h5"
    fake.write_bytes(b"not the shipped model")
    monkeypatch.setattr(build, "SHIPPED_MODEL", fake)
    with pytest.raises(BdpruningError, match="is not the shipped demo BadNet .* pass --rebuild"):
        build_demo(tmp_path / "demo")
    monkeypatch.setattr(build, "SHIPPED_MODEL", tmp_path / "missing.h5")
    with pytest.raises(BdpruningError, match="the shipped demo BadNet is missing"):
        build_demo(tmp_path / "demo")
    assert not (tmp_path / "demo").exists()


def _readme_table() -> dict[str, tuple[str, ...]]:
    """The README's demo pruning table: row name -> (channels pruned, clean accuracy, ASR)."""
    lines = README.read_text().splitlines()
    assert lines.count(TABLE_HEADER) == 1, "the README quotes the demo's pruning table once"
    rows = {}
    for line in lines[lines.index(TABLE_HEADER) + 2:]:
        if not line.startswith("|"):
            break
        name, *cells = (cell.strip() for cell in line.strip().strip("|").split("|"))
        rows[name] = tuple(cells)
    return rows


def _pct(value: float) -> str:
    return f"{value:.2f} %"


def _sweep_table(result: SweepResult) -> dict[str, tuple[str, ...]]:
    """The same table from a sweep, formatted as the demo's report formats it."""
    base = result.all_steps[0]
    rows = {"baseline": ("0", _pct(base.clean_accuracy), _pct(base.attack_success_rate))}
    for hit in result.thresholds:
        assert hit.reached, f"the {hit.threshold:g}-point threshold is reached on the shipped model"
        rows[f"{hit.threshold:g} pts"] = (str(hit.step), _pct(hit.clean_accuracy), _pct(hit.attack_success_rate))
    return rows


@torch.inference_mode()
def _step_logits(model, dataset, order, steps) -> torch.Tensor:
    """Logits (len(steps), N, classes), as float64, with channels ``order[:step]`` zeroed at
    ``pool_3`` (exactly what the sweep and a masked model compute) for each step of ``steps``."""
    split, outputs = split_at(model, "pool_3"), []
    handle = find_layer(model, "output")[1].register_forward_hook(lambda m, i, out: outputs.append(out.double()))
    try:
        images = torch.cat([batch for batch, _ in dataset.batches(1024)])
        value, *others = split.prefix(images.to(next(model.parameters()).dtype))
        for step in steps:
            masked = value.clone()
            masked[:, order[:step]] = 0
            split.suffix(masked, *others)
    finally:
        handle.remove()
    return torch.stack(outputs)


def _safe(model64, dataset, order, steps) -> np.ndarray:
    """(len(steps), N): whether each image's float64 top-2 logit margin at each step is beyond what
    float32 round-off can swap on any machine (:attr:`bdpruning.numerics.roundoff.Reference.safe`)."""
    depth = accumulation_depth(model64)
    return np.stack([Reference(logits.numpy(), depth).safe for logits in _step_logits(model64, dataset, order, steps)])


def _float32_within_bound(model32, model64, dataset) -> bool:
    """Whether this machine's float32 logits (nothing pruned) are within the round-off bound of
    the float64 ones: the bound that :func:`_safe` relies on holds here."""
    single, exact = _step_logits(model32, dataset, [], [0])[0], _step_logits(model64, dataset, [], [0])[0]
    bound = Reference(exact.numpy(), accumulation_depth(model64)).logit_bound
    return bool(((single - exact).abs().amax(dim=1).numpy() <= bound).all())


def test_readme_pruning_table_is_the_shipped_models_on_any_machine(shipped_demo):
    model32 = load_model(build.SHIPPED_MODEL, device="cpu")  # DeepID from the .h5, no TensorFlow
    model64 = copy.deepcopy(model32).double()
    clean = read_h5_dataset(shipped_demo.clean_valid, num_classes=10)
    poisoned = read_h5_dataset(shipped_demo.poisoned_valid, num_classes=10)
    result = run_sweep(model32, clean, poisoned, thresholds=THRESHOLDS)
    exact = run_sweep(model64, clean, poisoned, thresholds=THRESHOLDS)
    assert exact.ranking.order == result.ranking.order and exact.all_steps == result.all_steps
    assert _sweep_table(result) == _readme_table()

    # Why float32 gives this table on every CPU: the ranking and every decision it counts are far
    # from float32 round-off.
    order, last = result.ranking.order, max(hit.step for hit in result.thresholds)
    means = sorted(exact.ranking.mean_activation)  # float32 moves a mean by ~1e-6 of itself
    assert all(b - a >= 1e-4 * b for a, b in zip(means[:last + 1], means[1:last + 2])), "ranking near-tie"
    reported = [0, *(hit.step for hit in result.thresholds)]  # where the table quotes accuracy and ASR
    # every clean prediction up to the last threshold step: the accuracy curve, so where each
    # threshold is first reached, and the accuracies quoted
    assert _safe(model64, clean, order, range(last + 1)).all()
    # poisoned predictions where the table quotes the ASR; between those steps a poisoned image
    # can be a near-tie (one is, at a relative margin of 7.8e-6 after 44 channels), which the
    # table does not depend on
    assert _safe(model64, poisoned, order, reported).all()
    assert _float32_within_bound(model32, model64, clean) and _float32_within_bound(model32, model64, poisoned)
