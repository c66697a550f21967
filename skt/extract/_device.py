"""Which torch device runs the network."""

from __future__ import annotations

import hashlib
import os
import warnings

import torch

from skt._utils import cpu_flags, cpu_model, huge_pages

__all__ = ["PRECISIONS", "machine_key", "native_bfloat16", "resolve_device",
           "resolve_precision"]

PRECISIONS = ("float32", "float16", "bfloat16", "int8")
"""Values of ``precision``: exact float32, autocast to a 16-bit type where it is native, or
int8 quantisation in ONNX Runtime (see :func:`~skt.extract.check_engine`)."""


def machine_key(threads: int) -> str:
    """A short hash of what an engine's speed depends on besides the network: the CPU
    (model and instruction sets), its cores, ``threads``, the engines' versions and
    whether torch's tensors sit on huge pages (:func:`skt._utils.huge_pages`; torch's
    engine ran 2.5x faster on them on the README's machine).

    A choice measured on one machine is not reused on another, nor after an upgrade.
    """
    try:
        import onnxruntime
        runtime = onnxruntime.__version__
    except ImportError:
        runtime = "none"
    text = "|".join([cpu_model(), " ".join(sorted(cpu_flags())), str(os.cpu_count()),
                     str(threads), torch.__version__, runtime, huge_pages()])
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: a CUDA GPU that supports it, or a
    CPU with AVX512-BF16 or AMX-BF16 instructions (oneDNN's fast bfloat16 kernels)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision that runs on ``device``: ``precision``, or float32 with a warning where
    the 16-bit type is not native (autocast there is several times slower, not faster).
    "int8" is returned as it is; :func:`~skt.extract.check_engine` says where it runs."""
    if precision == "float16" and device.type != "cuda":
        warnings.warn(f"precision='float16' runs on CUDA only; on {device.type} the network "
                      "runs in float32.", UserWarning, stacklevel=4)
        return "float32"
    if precision == "bfloat16" and not native_bfloat16(device):
        where = ("this GPU" if device.type == "cuda" else
                 "this CPU, which has neither AVX512-BF16 nor AMX instructions")
        warnings.warn(f"precision='bfloat16' is not native on {where}: emulated, it would be "
                      "slower than float32, so the network runs in float32.", UserWarning,
                      stacklevel=4)
        return "float32"
    return precision


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

