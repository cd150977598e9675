"""The device feed reads an HDF5 set once for every ImageData over it (each predict_labels call
adapts the set anew), and gives the same batches."""

from __future__ import annotations

import numpy as np
import torch

from bdpruning import read_h5_dataset
from bdpruning.data.feed import model_batches
from bdpruning.data.forms import as_image_data
from bdpruning.data.hdf5 import H5ImageSet
from helpers.data import write_h5_set


def test_every_image_data_over_one_hdf5_set_shares_its_resident_copy(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    path = write_h5_set(tmp_path / "set.h5", rng.integers(0, 256, (9, 3, 5, 4), dtype=np.uint8),
                        rng.integers(0, 3, 9))
    dataset = read_h5_dataset(path)
    reads = []
    raw = H5ImageSet.raw
    monkeypatch.setattr(H5ImageSet, "raw", lambda self, start, stop: reads.append(start) or raw(self, start, stop))
    first = [b for b, _ in model_batches(as_image_data(dataset), 4, torch.device("cpu"), channels_last=True)]
    assert reads  # read once...
    reads.clear()
    again = [b for b, _ in model_batches(as_image_data(dataset), 4, torch.device("cpu"), channels_last=True)]
    assert not reads  # ...and not again by another adaptation of the same set
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = read_h5_dataset(path)  # another set object (the file may have changed): read anew
    list(model_batches(as_image_data(other), 4, torch.device("cpu"), channels_last=True))
    assert reads
