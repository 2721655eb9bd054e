"""Device choice and bf16 autocast, in one place so no module repeats the device line."""

from __future__ import annotations

import contextlib

import torch


def select_device(pref: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    if pref not in ("cpu", "cuda") and not pref.startswith("cuda:"):
        raise ValueError(f"unknown device {pref!r}: use 'auto', 'cpu' or 'cuda'")
    return torch.device(pref)


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast_context(device: torch.device, enabled: bool = True):
    """bf16 autocast on a CUDA device that supports it; a no-op context otherwise."""
    if enabled and bf16_supported(device):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
