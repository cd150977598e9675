"""``build_demo``: the embedded default BadNet and its data, built once and then reused.

A demo directory holds the data files of :data:`~bdpruning.demo.dataset.DATA_FILES`, the
Keras BadNet ``bd_net.h5`` and ``demo.json`` (the build's parameters, where the model comes
from, each file's SHA-256, the metrics on the test split). The data are generated
deterministically. With the default parameters the BadNet is the shipped
:data:`SHIPPED_MODEL` (no TensorFlow, the same weights on every machine); other parameters,
or ``rebuild=True``, train one in Keras (TensorFlow training is not reproducible across CPUs).
A call whose parameters match ``demo.json`` and whose files still hash as recorded returns at
once; any other call rebuilds the whole directory atomically (an interrupted build leaves the
previous state).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..runtime.atomic import atomic_dir, write_json
from ..errors import BdpruningError, file_error
from ..models.loading import load_model
from .dataset import DATA_FILES, DemoData, make_demo_data, write_demo_data

__all__ = ["DemoFiles", "MANIFEST", "MODEL_FILE", "SHIPPED_MODEL", "build_demo"]

logger = logging.getLogger(__name__)

#: The BadNet, a full Keras model file as the course's ``bd_net.h5``.
MODEL_FILE = "bd_net.h5"
#: The build record: parameters, file hashes, metrics.
MANIFEST = "demo.json"
# Bump when the recipe changes (data, trigger, training): older demo directories are rebuilt.
_RECIPE = 1
# Largest |Keras - bdpruning| probability difference accepted for the saved BadNet.
_PARITY_TOLERANCE = 1e-4
#: The demo BadNet the project ships: what this builder trained once with the default
#: parameters (seed 0), so that every machine prunes the same weights and prints the README's
#: numbers. A full Keras model file, as the course's ``bd_net.h5``.
SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "data" / "demo_bd_net.h5"
# The build parameters SHIPPED_MODEL was trained with (build_demo's defaults), and its hash.
_SHIPPED_PARAMETERS = {
    "recipe": 1, "seed": 0, "epochs": 8, "train_per_class": 400, "valid_per_class": 50,
    "test_per_class": 50, "poison_fraction": 0.1, "target": 0,
}
_SHIPPED_SHA256 = "0b30ec7a6563486879bc9ae49a7cf25c4dc7f49d9651bf1b71272a0e572ae6d9"


@dataclass(frozen=True)
class DemoFiles:
    """A built demo directory: file paths by role, the attack's target, the test metrics and
    where the BadNet comes from (``model_source``: ``shipped`` or ``trained`` on this machine)."""

    directory: Path
    target: int
    num_classes: int
    clean_accuracy: float
    attack_success_rate: float
    model_source: str
    model_sha256: str

    @property
    def shipped_model(self) -> bool:
        """Whether the BadNet is :data:`SHIPPED_MODEL`, so that the numbers are the README's."""
        return self.model_source == "shipped"

    @property
    def bd_net(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def clean_train(self) -> Path:
        return self.directory / DATA_FILES["clean_train"]

    @property
    def clean_valid(self) -> Path:
        return self.directory / DATA_FILES["clean_valid"]

    @property
    def clean_test(self) -> Path:
        return self.directory / DATA_FILES["clean_test"]

    @property
    def poisoned_valid(self) -> Path:
        return self.directory / DATA_FILES["poisoned_valid"]

    @property
    def poisoned_test(self) -> Path:
        return self.directory / DATA_FILES["poisoned_test"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _reusable(out: Path, parameters: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of ``out`` if it was built with ``parameters`` and its files are intact."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("parameters") != parameters:
        logger.info("%s was built with other parameters: rebuilding", out)
        return None
    for name, digest in manifest.get("files", {}).items():
        if not (out / name).is_file() or _sha256(out / name) != digest:
            logger.info("%s: %s is missing or changed: rebuilding", out, name)
            return None
    if parameters["model"] == "shipped" and manifest.get("model", {}).get("sha256") != _SHIPPED_SHA256:
        logger.info("%s holds another shipped model: rebuilding", out)
        return None
    return manifest


def _test_metrics(probabilities: np.ndarray, data: DemoData) -> dict[str, float]:
    """Clean accuracy and attack success rate from the probabilities of clean + poisoned test images."""
    predicted = probabilities.argmax(axis=1)
    n_clean = len(data.clean_test[1])
    return {
        "clean_accuracy": float(np.mean(predicted[:n_clean] == data.clean_test[1])),
        "attack_success_rate": float(np.mean(predicted[n_clean:] == data.poisoned_test[1])),
    }


def _test_images(data: DemoData) -> np.ndarray:
    return np.concatenate([data.clean_test[0], data.poisoned_test[0]])


def _copy_shipped(directory: Path, data: DemoData) -> dict[str, Any]:
    """Copy :data:`SHIPPED_MODEL` into ``directory`` (checked against its hash); return its metrics."""
    if not SHIPPED_MODEL.is_file():
        raise file_error(SHIPPED_MODEL, "the shipped demo BadNet is missing (it comes with a clone of the "
                                        "repository); pass --rebuild to train one instead")
    if _sha256(SHIPPED_MODEL) != _SHIPPED_SHA256:
        raise file_error(SHIPPED_MODEL, "is not the shipped demo BadNet (its SHA-256 differs); restore it "
                                        "with git, or pass --rebuild to train one instead")
    path = Path(shutil.copyfile(SHIPPED_MODEL, directory / MODEL_FILE))
    with torch.inference_mode():
        probabilities = load_model(path, device="cpu")(torch.from_numpy(_test_images(data).astype(np.float32)))
    return {**_test_metrics(probabilities.numpy(), data), "evaluated_with": "bdpruning (PyTorch, CPU)"}


def _train_and_check(directory: Path, data: DemoData, num_classes: int, epochs: int, seed: int) -> dict[str, Any]:
    try:
        from . import train
    except ImportError as error:
        raise BdpruningError(f"training the demo BadNet needs the [convert] extra ({error}): "
                             "pip install 'bdpruning[convert,demo]'") from None
    images = np.concatenate([data.clean_train[0], data.poisoned_train[0]])
    labels = np.concatenate([data.clean_train[1], data.poisoned_train[1]])
    logger.info("training the Keras BadNet on %d images (%d poisoned), %d epoch(s)",
                len(images), len(data.poisoned_train[0]), epochs)
    model = train.train_badnet(images, labels, num_classes=num_classes, epochs=epochs, seed=seed)
    path = train.save_keras_h5(model, directory / MODEL_FILE)
    test_images = _test_images(data)
    keras_probs = train.keras_probabilities(model, test_images)
    with torch.inference_mode():
        torch_probs = load_model(path, device="cpu")(torch.from_numpy(test_images.astype(np.float32))).numpy()
    difference = float(np.abs(keras_probs - torch_probs).max())
    if difference > _PARITY_TOLERANCE:
        raise RuntimeError(f"{path}: bdpruning's DeepID differs from Keras by {difference:.2e}")
    return {
        **_test_metrics(keras_probs, data),
        "evaluated_with": "keras",
        "max_probability_difference_keras_vs_bdpruning": difference,
        "keras_version": train.keras.__version__,
        "tensorflow_version": train.tf.__version__,
    }


def _build(out: Path, parameters: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    with atomic_dir(out) as directory:
        data = make_demo_data(
            seed=parameters["seed"], train_per_class=parameters["train_per_class"],
            valid_per_class=parameters["valid_per_class"], test_per_class=parameters["test_per_class"],
            poison_fraction=parameters["poison_fraction"], target=parameters["target"],
        )
        write_demo_data(directory, data)
        num_classes = int(data.clean_train[1].max()) + 1
        if parameters["model"] == "shipped":
            metrics = _copy_shipped(directory, data)
            model = {"source": "shipped", "file": f"{SHIPPED_MODEL.parent.name}/{SHIPPED_MODEL.name}"}
        else:
            metrics = _train_and_check(directory, data, num_classes, parameters["epochs"], parameters["seed"])
            model = {"source": "trained"}
        names = [*DATA_FILES.values(), MODEL_FILE]
        files = {name: _sha256(directory / name) for name in names}
        manifest = {
            "parameters": parameters,
            "num_classes": num_classes,
            "model": {**model, "sha256": files[MODEL_FILE]},
            "files": files,
            "metrics": metrics,
        }
        write_json(directory / MANIFEST, manifest)
    logger.info("built the demo in %s in %.0f s (%s model): clean accuracy %.3f, attack success rate %.3f", out,
                time.perf_counter() - start, model["source"], metrics["clean_accuracy"], metrics["attack_success_rate"])
    return manifest


def build_demo(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    epochs: int = 8,
    train_per_class: int = 400,
    valid_per_class: int = 50,
    test_per_class: int = 50,
    poison_fraction: float = 0.1,
    target: int = 0,
    rebuild: bool = False,
) -> DemoFiles:
    """Build (or reuse) the demo: MNIST digits in the course's format and a Keras BadNet.

    The BadNet (DeepID, 10 classes) learns the clean digits and sends any digit carrying the
    trigger to ``target``. With the default parameters it is :data:`SHIPPED_MODEL` (the
    README's numbers on every machine); other parameters, or ``rebuild`` (always retrains),
    train one in Keras. Reduced settings (a few images per class, one epoch) give a fast, weak
    build for tests. An existing ``out_dir`` that is not a demo directory is refused.
    """
    if epochs < 1:
        raise BdpruningError(f"epochs must be at least 1, got {epochs}")
    out = Path(out_dir)
    parameters = {
        "recipe": _RECIPE, "seed": seed, "epochs": epochs, "train_per_class": train_per_class,
        "valid_per_class": valid_per_class, "test_per_class": test_per_class,
        "poison_fraction": poison_fraction, "target": target,
    }
    parameters["model"] = "shipped" if parameters == _SHIPPED_PARAMETERS and not rebuild else "trained"
    manifest = None if rebuild else _reusable(out, parameters)
    if manifest is None:
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
            raise file_error(out, "exists and is not a demo directory; choose a new or empty directory")
        manifest = _build(out, parameters)
    else:
        logger.info("reusing the demo in %s", out)
    metrics, model = manifest["metrics"], manifest["model"]
    return DemoFiles(out, target, manifest["num_classes"], metrics["clean_accuracy"], metrics["attack_success_rate"],
                     model["source"], model["sha256"])
