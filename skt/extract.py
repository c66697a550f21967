"""Batched, eval-mode forward passes that return per-layer pooling summaries."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from skt.backbones import Preprocessing, truncate
from skt.images import ImageDataset, collate
from skt.pooling import summarize, summary_kind

__all__ = [
    "FeatureModel",
    "LayerLayout",
    "TorchEngine",
    "build_feature_model",
    "default_num_workers",
    "fingerprint_module",
    "iter_batches",
    "resolve_device",
]


@dataclass(frozen=True)
class LayerLayout:
    """How one requested layer appears in the summaries and in the output."""

    name: str
    kind: str  # "stats", "flat" or "vector": see skt.pooling.summary_kind
    width: int  # columns of its summary


class FeatureModel(nn.Module):
    """The truncated backbone followed by :func:`skt.pooling.summarize` per layer.

    Returns a tuple with one ``(N, K)`` float32 summary per layer, in order: a
    plain tensor output, so the same module runs eagerly or exported to ONNX.
    """

    def __init__(self, body: nn.Module, layers: Sequence[str], pooling: str) -> None:
        super().__init__()
        self.body = body
        self.layers = list(layers)
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.body(x)
        return tuple(summarize(outputs[name], self.pooling) for name in self.layers)


def build_feature_model(network: nn.Module, size: int, layers: list[str],
                        pooling: str) -> tuple[FeatureModel, list[LayerLayout]]:
    """Truncate ``network`` after ``layers`` and probe, at ``size`` px, the summaries' layout.

    ``network`` is modified (its classifier may be replaced): pass a copy.
    """
    model = FeatureModel(truncate(network, layers), layers, pooling).eval()
    with torch.inference_mode():
        raw = model.body(torch.zeros(1, 3, size, size))
    layout = []
    for name in layers:
        output = raw[name]
        if not torch.is_tensor(output):
            raise TypeError(f"Layer {name!r} returns a {type(output).__name__}, not a tensor; "
                            "pick a layer whose output is one tensor.")
        kind = summary_kind(output.ndim, pooling)
        layout.append(LayerLayout(name, kind, summarize(output, pooling).shape[1]))
    return model, layout


def fingerprint_module(module: nn.Module) -> str:
    """Content hash of a module's parameters and buffers (names, dtypes, values)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


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


def default_num_workers() -> int:
    """Decoding workers for image files: one per core, up to 4."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))


class TorchEngine:
    """Runs a :class:`FeatureModel` eagerly: eval mode, ``inference_mode``, batches.

    On the CPU the model and inputs are channels-last, which oneDNN convolutions
    run faster. ``dtype`` ("float16" / "bfloat16") turns on autocast on CUDA only:
    on CPUs without bf16 units it is several times slower.
    """

    name = "torch"

    def __init__(self, model: FeatureModel, device: torch.device, dtype: str | None = None) -> None:
        self.device = device
        self.dtype = getattr(torch, dtype) if dtype and device.type == "cuda" else None
        self.memory_format = (torch.channels_last if device.type == "cpu"
                              else torch.contiguous_format)
        self.model = model.to(device=device, memory_format=self.memory_format).eval()

    def __call__(self, batch: torch.Tensor) -> list[np.ndarray]:
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True).contiguous(
                memory_format=self.memory_format)
            with torch.autocast(self.device.type, dtype=self.dtype,
                                enabled=self.dtype is not None):
                outputs = self.model(x)
        return [out.float().cpu().numpy() for out in outputs]


def iter_batches(images: Sequence, config: Preprocessing, batch_size: int,
                 num_workers: int, indices: Sequence[int] | None = None,
                 ) -> Iterator[torch.Tensor]:
    """Preprocessed batches of ``images`` (or of the items at ``indices``), in order."""
    dataset = ImageDataset(images, config, indices)
    # Worker processes pay off when there are files to decode and enough of them.
    decode = any(isinstance(images[i], str | os.PathLike) for i in dataset.indices[:1])
    workers = num_workers if decode and len(dataset) > batch_size else 0
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=collate, pin_memory=False,
        prefetch_factor=4 if workers else None, persistent_workers=False,
    )
    yield from loader
