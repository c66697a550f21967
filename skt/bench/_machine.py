"""The machine a comparison runs on, printed beside its numbers."""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np
import sklearn
import torch
import torchvision

from skt._utils import available_cores, cpu_flags, cpu_model, huge_pages, resolve_num_workers
from skt._version import __version__
from skt.extract import resolve_device

__all__ = ["HEAD_BLAS_THREADS", "format_machine", "machine_info"]

HEAD_BLAS_THREADS = 1
"""BLAS threads (NumPy/SciPy) while rows fit and predict. The heads' problems
are small (thousands of rows, at most a few thousand columns), where threads
add synchronisation and no speed; on a machine shared with other jobs,
spinning BLAS threads made a 480 x 1024 LogisticRegression fit 75 x slower
than one thread. Torch's own threads (FineTuneClassifier, extraction) are not
affected."""


INSTRUCTION_SETS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",
                    "amx_bf16", "amx_int8")
"""CPU flags that change which engine and precision run fastest (Linux names)."""


def _instruction_sets() -> list[str]:
    """Which of :data:`INSTRUCTION_SETS` the CPU has; torch's own report off Linux."""
    flags = cpu_flags()
    if flags:
        return [name for name in INSTRUCTION_SETS if name in flags]
    return [torch.backends.cpu.get_cpu_capability().lower()]


def machine_info() -> dict[str, Any]:
    """The machine a comparison runs on: CPU and its instruction sets, cores, threads, versions.

    Absolute times are only comparable on one machine: the same code runs
    at different speeds on an AVX2-only CPU and on one with AVX-512 VNNI
    and bfloat16 units, which ``instruction_sets`` tells apart.

    Examples
    --------
    >>> from skt.bench import machine_info
    >>> info = machine_info()
    >>> info["cpu_cores"] >= 1 and info["torch_threads"] >= 1
    True
    """
    return {
        "cpu": cpu_model(),
        "instruction_sets": _instruction_sets(),
        "cpu_cores": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "device": str(resolve_device("auto")),
        "decoding_workers": resolve_num_workers(None),
        "blas_threads_for_heads": HEAD_BLAS_THREADS,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "huge_pages": huge_pages(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "skt": __version__,
    }


def format_machine(info: dict[str, Any]) -> str:
    """One line describing ``info`` from :func:`machine_info`."""
    load = info.get("load_average")
    busy = f", load average {load[0]:.1f}" if load else ""
    sets = info.get("instruction_sets")
    flags = f" ({' '.join(sets)})" if sets else ""
    pages = f", huge pages {info['huge_pages']}" if info.get("huge_pages") else ""
    return (f"Machine: {info['cpu']}{flags}, {info['cpu_cores']} CPU cores, "
            f"{info['torch_threads']} torch threads, device {info['device']}{busy}{pages}; "
            f"torch {info['torch']}, torchvision {info['torchvision']}, "
            f"scikit-learn {info['scikit-learn']}, skt {info['skt']}")
