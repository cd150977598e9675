"""One set of data checks: an HDF5 file and the same data as tensors are refused with the same
message, and every reader of a batch size refuses the same values."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bdpruning import BdpruningError, as_image_data, read_h5_dataset
from bdpruning.data.feed import model_batches
from helpers.data import write_h5_set


def _problem(call) -> str:
    """The error's message after the ``where:`` that names the source."""
    with pytest.raises(BdpruningError) as error:
        call()
    return str(error.value).split(": ", 1)[1]


@pytest.mark.parametrize("labels, kwargs", [
    (np.array([0, 1, 2, 10]), dict(num_classes=10)),
    (np.array([0, -1, 2, 3]), dict()),
    (np.array([0, 1, 2, 3]), dict(image_shape=(3, 9, 9))),
])
def test_a_file_and_its_tensors_are_refused_alike(tmp_path, labels, kwargs):
    images = np.zeros((4, 3, 8, 8), np.uint8)
    path = write_h5_set(tmp_path / "set.h5", images, labels)
    from_file = _problem(lambda: read_h5_dataset(path, **kwargs))
    assert from_file == _problem(lambda: as_image_data(path, **kwargs))
    assert from_file == _problem(lambda: as_image_data((torch.from_numpy(images), torch.from_numpy(labels)),
                                                       **kwargs))
    assert "None" not in from_file


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "8"])
def test_every_reader_refuses_the_same_batch_sizes(size):
    data = as_image_data((torch.zeros(3, 3, 4, 4), torch.zeros(3, dtype=torch.int64)))
    problem = f"batch size must be an integer of at least 1 (got {size!r})"
    for call in (lambda: next(data.batches(size)), lambda: next(model_batches(data, size, torch.device("cpu")))):
        with pytest.raises(BdpruningError, match=re.escape(problem)):
            call()


def test_data_held_whole_is_read_as_stored_and_streamed_data_is_not(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 3, 4, 4), dtype=np.uint8), np.arange(5)
    path = write_h5_set(tmp_path / "s.h5", images, labels.astype(np.float64))
    for data in (as_image_data(path), as_image_data((torch.from_numpy(images), torch.from_numpy(labels)))):
        stored = data.stored()
        assert stored.dtype == torch.uint8 and stored.image_shape == (3, 4, 4)
        assert np.array_equal(stored.read(1, 4).numpy(), images[1:4]) and stored.labels.tolist() == list(range(5))
    loader = DataLoader(TensorDataset(torch.from_numpy(images).float(), torch.from_numpy(labels)), batch_size=2)
    assert as_image_data(loader).stored() is None
