"""Choosing the torch device from a user's ``auto|cpu|cuda`` choice."""

from __future__ import annotations

import torch
from torch import nn

from .errors import BdpruningError

__all__ = ["model_input", "resolve_device"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) picks CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise BdpruningError(f"device {device!r} requested but CUDA is not available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise BdpruningError(f"unknown device {device!r} (use auto, cpu or cuda)") from None


def model_input(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``images`` on ``model``'s device, in its parameters' dtype (float64 for a ``.double()`` copy)."""
    parameter = next(model.parameters())
    return images.to(parameter.device, parameter.dtype)
