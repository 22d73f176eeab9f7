"""Device and dtype selection: never assume a GPU, never silently fall back."""

from __future__ import annotations

import torch

from latticeflow.base.errors import LatticeflowError

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def select_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LatticeflowError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LatticeflowError(f"device {name!r} requested but CUDA is not available here")
    return device


def select_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise LatticeflowError(f"unknown dtype {name!r} (use {' or '.join(DTYPES)})")
    return DTYPES[name]
