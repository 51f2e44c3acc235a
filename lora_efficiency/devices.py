"""Devices: the `device` setting made a torch.device, and its name for the run's tags."""

from __future__ import annotations

import platform

import torch

from lora_efficiency.errors import UserError


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when torch sees one, else the CPU; a device torch cannot see is a UserError (exit 2)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but torch sees no CUDA device: allowed here are 'auto' and 'cpu'")
    if device.type == "cuda" and (device.index or 0) >= (count := torch.cuda.device_count()):
        raise UserError(
            f"device={name!r} is invalid: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
