"""Image files: read raw (0..255), wrong sizes and unreadable files named in one line."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from bdpruning import BdpruningError
from bdpruning.data.images import read_image
from helpers.material import CLEAN_IMAGE


def test_images_are_read_raw_and_wrong_sizes_named(tmp_path, face_images):
    image = read_image(CLEAN_IMAGE)
    assert image.dtype == torch.float32 and torch.equal(image, face_images[0])  # 0..255, not scaled
    big = tmp_path / "big.jpg"
    Image.new("RGB", (94, 110), (200, 10, 10)).save(big)
    with pytest.raises(BdpruningError, match=r"big.jpg: image is 94x110 \(width x height\), the model takes 47x55"):
        read_image(big)
    resized = read_image(big, resize=True)
    assert resized.shape == (3, 55, 47) and abs(resized[0].mean().item() - 200) < 2
    junk = tmp_path / "junk.png"
    junk.write_text("not a picture")
    with pytest.raises(BdpruningError, match="junk.png: cannot read the image"):
        read_image(junk)
