"""Reading PNG/JPEG files into the model's input: float (3, H, W) RGB in raw 0..255 (not scaled)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import file_error

__all__ = ["read_image", "read_images"]


def read_image(
    path: str | os.PathLike[str], input_shape: Sequence[int] = (3, 55, 47), resize: bool = False
) -> torch.Tensor:
    """One image as float32 (3, H, W) in 0..255; another size is an error unless ``resize``."""
    path = Path(path)
    _, height, width = input_shape
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except FileNotFoundError:
        raise file_error(path, "no such file") from None
    except IsADirectoryError:
        raise file_error(path, "is a directory, expected an image file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise file_error(path, f"cannot read the image ({exc.__class__.__name__})") from None
    if image.size != (width, height):
        if not resize:
            raise file_error(
                path,
                f"image is {image.width}x{image.height} (width x height), the model takes "
                f"{width}x{height}; resize it first or pass --resize",
            )
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy())


def read_images(
    paths: Sequence[str | os.PathLike[str]], input_shape: Sequence[int] = (3, 55, 47), resize: bool = False
) -> torch.Tensor:
    """Images as one float32 (N, 3, H, W) batch in 0..255 (see :func:`read_image`)."""
    return torch.stack([read_image(path, input_shape, resize) for path in paths])
