"""Which torch device a config's ``device`` value names (bottom layer)."""

from __future__ import annotations

import torch

from rapm.errors import RapmError


class DeviceError(RapmError, ValueError):
    """A configured device is unknown or not present on this machine."""


def resolve_device(name: str, *, key: str = "device") -> torch.device:
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:<index>``; ``key`` names the
    config key in the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    head, _, index = str(name).partition(":")
    if head not in ("cpu", "cuda") or (index and not (head == "cuda" and index.isdigit())):
        raise DeviceError(f"{key} is {name!r}; expected auto, cpu, cuda or cuda:<index>")
    if head == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{key} is {name!r} but no CUDA device is available; use auto or cpu")
    return torch.device(name)
