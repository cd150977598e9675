"""The HDF5 reader: the course's layout streamed as raw pixels, bad files named in one line."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from bdpruning import BdpruningError, read_h5_dataset
from helpers.data import write_h5_set


@pytest.mark.parametrize(
    "data,labels,problem",
    [
        (np.zeros((4, 55, 47, 3), np.uint8), np.zeros(4), "channels-last"),
        (np.zeros((4, 3, 50, 47), np.uint8), np.zeros(4), "model expects"),
        (np.zeros((0, 3, 55, 47), np.uint8), np.zeros(0), "empty"),
        (np.zeros((4, 3, 55, 47), np.uint8), np.zeros(3), "'label' has shape"),
        (np.zeros((4, 3, 55, 47), np.uint8), np.array([0, 1, 2, 10]), "outside the model's 10 classes"),
        (np.zeros((4, 3, 55, 47), np.uint8), np.array([0, 1.5, 2, 3]), "non-integer"),
    ],
)
def test_bad_data_files_get_one_line_errors(tmp_path, data, labels, problem):
    path = write_h5_set(tmp_path / "set.h5", data, labels)
    with pytest.raises(BdpruningError, match=problem):
        read_h5_dataset(path, num_classes=10, image_shape=(3, 55, 47))


def test_data_missing_keys_are_named(tmp_path):
    path = tmp_path / "nolabel.h5"
    with h5py.File(path, "w") as handle:
        handle["data"] = np.zeros((2, 3, 55, 47), np.uint8)
    with pytest.raises(BdpruningError, match="nolabel.h5: missing dataset\\(s\\) 'label'"):
        read_h5_dataset(path)


def test_data_reader_streams_raw_pixels(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (7, 3, 55, 47), dtype=np.uint8)
    dataset = read_h5_dataset(write_h5_set(tmp_path / "s.h5", data, np.arange(7.0)))
    images = torch.cat([b for b, _ in dataset.batches(3)])
    assert images.dtype == torch.float32 and images.max() > 200  # raw 0..255, not scaled
    np.testing.assert_array_equal(images.numpy(), data)
    items = dataset.__getitems__([5, 1, 3])
    np.testing.assert_array_equal(torch.stack([x for x, _ in items]).numpy(), data[[5, 1, 3]])
    assert [int(y) for _, y in items] == [5, 1, 3]
