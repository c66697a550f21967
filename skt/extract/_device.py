"""Which torch device runs the network."""

from __future__ import annotations

import warnings

import torch

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device, *, fallback: bool = False) -> torch.device:
    """``"auto"`` picks CUDA, then MPS, then CPU.

    An explicit CUDA or MPS device that is not available raises, unless
    ``fallback`` (a model fitted elsewhere and loaded here), which warns and
    uses the CPU.
    """
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device={str(device)!r} is not a torch device; use 'auto', 'cpu', "
                         "'cuda', 'cuda:1' or 'mps'.") from exc
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }.get(resolved.type, True)
    if available:
        return resolved
    if fallback:
        warnings.warn(f"device={str(device)!r} is not available on this machine; using the CPU.",
                      RuntimeWarning, stacklevel=3)
        return torch.device("cpu")
    raise ValueError(f"device={str(device)!r} is not available on this machine; use "
                     "device='auto' or 'cpu'.")

