"""Layer outputs ``(N, C, H, W)`` to feature rows ``(N, D)``, in two steps.

:func:`summarize` runs with the network (in torch, or inside an exported
ONNX graph) and keeps only what any pooling needs: per channel the mean, the
maximum and the mean of cubes for GeM, ``3 C`` numbers per image instead of
``C H W``. :func:`pool` finishes in numpy. The split lets the feature cache
store the summary once and serve every pooling from it without a forward pass;
only ``"flatten"`` needs the whole map and stores it.

Outputs that are already vectors ``(N, D)`` pass through unchanged, whatever
the pooling. Token outputs ``(N, L, D)`` (vision transformers) pool over ``L``.

Examples
--------
>>> import torch
>>> from skt.pooling import pool, summarize
>>> maps = torch.arange(8.0).reshape(1, 2, 2, 2)  # two channels of 2x2
>>> summary = summarize(maps, "avg").numpy()  # mean, max, mean of cubes per channel
>>> pool(summary, "stats", "avg").tolist(), pool(summary, "stats", "max").tolist()
([[1.5, 5.5]], [[3.0, 7.0]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["GEM_EPS", "GEM_P", "POOLINGS", "LayerLayout", "feature_names", "pool", "pool_into",
           "summarize", "summary_kind"]

POOLINGS = ("avg", "max", "gem", "avgmax", "flatten")
GEM_P = 3.0
GEM_EPS = 1e-6


@dataclass(frozen=True)
class LayerLayout:
    """How one requested layer appears in the summaries and in the output."""

    name: str
    kind: str  # "stats", "flat" or "vector": see summary_kind
    width: int  # columns of its summary

    def feature_names(self, pooling: str) -> list[str]:
        """Output column names of this layer under ``pooling``."""
        return feature_names(self.name, self.kind, pooling, self.width)


def summary_kind(ndim: int, pooling: str) -> str:
    """``"vector"`` (already pooled), ``"flat"`` (whole map) or ``"stats"``."""
    if ndim == 2:
        return "vector"
    if ndim not in (3, 4):
        raise ValueError(f"Cannot pool a layer output with {ndim} dimensions; skt pools "
                         "(N, C, H, W) maps, (N, L, D) tokens and (N, D) vectors.")
    return "flat" if pooling == "flatten" else "stats"


def summarize(x: torch.Tensor, pooling: str) -> torch.Tensor:
    """What :func:`pool` needs of one layer output, as ``(N, K)`` float32."""
    kind = summary_kind(x.ndim, pooling)
    x = x.float()
    if kind == "vector":
        return x
    if kind == "flat":
        return x.flatten(1)
    dims = (2, 3) if x.ndim == 4 else (1,)
    gem = x.clamp(min=GEM_EPS).pow(GEM_P).mean(dims)
    return torch.cat([x.mean(dims), x.amax(dims), gem], dim=1)


def pool(summary: np.ndarray, kind: str, pooling: str) -> np.ndarray:
    """Finish pooling from a :func:`summarize` output, as float32 ``(N, D)``."""
    if kind != "stats":
        return np.asarray(summary, dtype=np.float32)
    avg, high, gem = np.split(np.asarray(summary, dtype=np.float32), 3, axis=1)
    if pooling == "avg":
        return avg
    if pooling == "max":
        return high
    if pooling == "gem":
        return np.power(gem, 1.0 / GEM_P, dtype=np.float32)
    if pooling == "avgmax":
        return np.concatenate([avg, high], axis=1)
    raise ValueError(f"Unknown pooling {pooling!r}; choose one of {POOLINGS}.")


def feature_names(layer: str, kind: str, pooling: str, width: int) -> list[str]:
    """Output column names of one layer whose summary is ``width`` wide."""
    if kind != "stats":
        return [f"{layer}_{i}" for i in range(width)]
    channels = width // 3
    if pooling == "avgmax":
        return [f"{layer}_{p}_{i}" for p in ("avg", "max") for i in range(channels)]
    return [f"{layer}_{pooling}_{i}" for i in range(channels)]


def pool_into(out: np.ndarray, rows: Sequence[int], summaries: Sequence[np.ndarray],
              layouts: Sequence[LayerLayout], pooling: str) -> None:
    """Pool each layer's summaries and write them side by side into ``out[rows]``."""
    start = 0
    for layout, summary in zip(layouts, summaries, strict=True):
        pooled = pool(summary, layout.kind, pooling)
        out[rows, start:start + pooled.shape[1]] = pooled
        start += pooled.shape[1]
