"""The device feed: resident and streamed batches hold the reader's values, copies share the resident set."""

from __future__ import annotations


import pytest
import torch

from bdpruning.data.feed import model_batches
from bdpruning.data.forms import as_image_data


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resident_and_streamed_batches_hold_the_reader_s_values(safe_set, channels_last, dtype, monkeypatch):
    path, _, _ = safe_set
    data = as_image_data(path)
    expected = list(data.batches(4))
    resident = list(model_batches(data, 4, torch.device("cpu"), dtype=dtype, channels_last=channels_last))
    assert data.resident  # loaded once, kept for the next pass
    monkeypatch.setattr("bdpruning.data.feed.resident_fits", lambda nbytes, device: False)
    streamed = list(model_batches(as_image_data(path), 4, torch.device("cpu"), dtype=dtype,
                                  channels_last=channels_last))
    for batches in (resident, streamed):
        assert len(batches) == len(expected) == 3
        for (images, labels), (want_images, want_labels) in zip(batches, expected):
            assert images.dtype == dtype and images.shape == want_images.shape
            assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            assert torch.equal(images, want_images.to(dtype)) and torch.equal(labels, want_labels)


def test_copies_of_image_data_share_the_resident_set(safe_set):
    data = as_image_data(safe_set[0])
    copy = as_image_data(data)
    list(model_batches(copy, 5, torch.device("cpu")))
    assert data.resident is copy.resident and len(data.resident) == 1
