"""Choosing the torch device from a user's ``auto|cpu|cuda`` choice."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import BdpruningError

__all__ = ["check_devices", "model_input", "resolve_device"]


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


def check_devices(accelerator: str = "auto", devices: int = 1) -> None:
    """Refuse more devices than the machine has (GPUs, or CPU cores for CPU processes)."""
    if devices < 1:
        raise BdpruningError(f"--devices must be at least 1 (got {devices})")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        available, kind = torch.cuda.device_count(), "GPU"
    elif accelerator in ("auto", "cpu"):
        available, kind = os.cpu_count() or 1, "CPU core"
    else:
        return  # Lightning checks the other accelerators itself
    if devices > available:
        raise BdpruningError(
            f"{devices} {accelerator} device(s) requested, but this machine has {available} {kind}(s)"
        )
