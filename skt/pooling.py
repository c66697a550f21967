"""Layer outputs to feature rows ``(N, D)``, in two steps.

:func:`summarize` runs with the network (in torch, or inside an exported
ONNX graph) and keeps only what any pooling needs: per channel the mean, the
maximum and the generalised mean (GeM), ``3 C`` numbers per image instead of
``C H W``, plus the class token of token outputs. :func:`pool` finishes in
numpy. The split lets the feature cache store the summary once and serve
every pooling from it without a forward pass; only ``"flatten"`` needs the
whole map and stores it. Each part of a summary is itself a feature, so the
mean of the summaries of several views of an image (test-time augmentation)
is the mean of their features.

What the axes of an output mean is an :class:`OutputFormat`, recognised
from its shape (:func:`output_format`):

- ``(N, C, H, W)`` maps (CNNs) and channels-last ``(N, H, W, C)`` maps (Swin)
  pool over ``H`` and ``W``;
- ``(N, T, C)`` tokens (vision transformers) pool over the patch tokens; the
  class token and other prefix tokens (registers) are left out of ``avg``,
  ``max`` and ``gem``, and ``"cls"`` takes the class token;
- ``(N, D)`` vectors are already pooled and pass through unchanged.

Examples
--------
>>> import torch
>>> from skt.pooling import pool, summarize
>>> maps = torch.arange(8.0).reshape(1, 2, 2, 2)  # two channels of 2x2
>>> summary = summarize(maps, "avg").numpy()  # mean, max, GeM per channel
>>> pool(summary, "stats", "avg").tolist(), pool(summary, "stats", "max").tolist()
([[1.5, 5.5]], [[3.0, 7.0]])
>>> tokens = torch.tensor([[[9.0], [1.0], [3.0]]])  # a class token, then two patch tokens
>>> from skt.pooling import OutputFormat
>>> summary = summarize(tokens, "avg", OutputFormat("NTC", prefix_tokens=1, class_token=True))
>>> pool(summary.numpy(), "tokens", "cls").tolist(), pool(summary.numpy(), "tokens", "avg").tolist()
([[9.0]], [[2.0]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["GEM_EPS", "GEM_P", "POOLINGS", "TOKEN_POOLINGS", "LayerLayout", "OutputFormat",
           "feature_names", "output_format", "pool", "pool_into", "summarize", "summary_kind"]

POOLINGS = ("avg", "max", "gem", "avgmax", "cls", "clsavg", "flatten")
TOKEN_POOLINGS = ("cls", "clsavg")
"""Poolings that need a class token: the class token, and the class token then the mean of
the patch tokens (DINO's linear probe of a ViT-B)."""
GEM_P = 3.0
GEM_EPS = 1e-6


@dataclass(frozen=True)
class OutputFormat:
    """What the axes of a layer output are.

    Attributes
    ----------
    axes : {"NC", "NCHW", "NHWC", "NTC"}
        Vectors, channels-first maps, channels-last maps, or tokens.
    prefix_tokens : int
        Tokens ahead of the patch tokens (class and register tokens), ``NTC`` only.
    class_token : bool
        Whether the first token is a class token, ``NTC`` only.
    """

    axes: str
    prefix_tokens: int = 0
    class_token: bool = False


def _is_square(n: int) -> bool:
    return n >= 0 and round(n ** 0.5) ** 2 == n


def output_format(shape: Sequence[int], prefix_tokens: int = 0,
                  class_token: bool = False) -> OutputFormat:
    """The format of an output of ``shape`` for a square input image.

    A 4-D output is channels-last when its two leading axes are equal and
    the last differs (``(N, 7, 7, 768)``), channels-first otherwise. A 3-D
    output is tokens; the network's ``prefix_tokens`` (its class and
    register tokens) are counted only where the rest form a square grid of
    patches, since layers before the class token is added (the patch
    embedding) have none.

    Examples
    --------
    >>> from skt.pooling import output_format
    >>> output_format((2, 7, 7, 768)).axes, output_format((2, 768, 7, 7)).axes
    ('NHWC', 'NCHW')
    >>> output_format((2, 197, 768), 1, True), output_format((2, 196, 768), 1, True)
    (OutputFormat(axes='NTC', prefix_tokens=1, class_token=True), OutputFormat(axes='NTC', \
prefix_tokens=0, class_token=False))
    """
    ndim = len(shape)
    if ndim == 2:
        return OutputFormat("NC")
    if ndim == 4:
        _, a, b, c = shape
        return OutputFormat("NHWC" if a == b != c else "NCHW")
    if ndim == 3:
        tokens = shape[1]
        if prefix_tokens and tokens > prefix_tokens and _is_square(tokens - prefix_tokens) \
                and not _is_square(tokens):
            return OutputFormat("NTC", prefix_tokens, class_token)
        return OutputFormat("NTC")
    raise ValueError(f"Cannot pool a layer output with {ndim} dimensions; skt pools "
                     "(N, C, H, W) and (N, H, W, C) maps, (N, T, C) tokens and (N, D) vectors.")


@dataclass(frozen=True)
class LayerLayout:
    """How one requested layer appears in the summaries and in the output."""

    name: str
    kind: str  # "stats", "tokens", "flat" or "vector": see summary_kind
    width: int  # columns of its summary

    def feature_names(self, pooling: str) -> list[str]:
        """Output column names of this layer under ``pooling``."""
        return feature_names(self.name, self.kind, pooling, self.width)


def _as_format(form: OutputFormat | int) -> OutputFormat:
    """A format, or the default one of an output with ``form`` dimensions (no prefix tokens)."""
    if isinstance(form, OutputFormat):
        return form
    return output_format((1,) * form) if form != 4 else OutputFormat("NCHW")


def summary_kind(form: OutputFormat | int, pooling: str) -> str:
    """``"vector"`` (already pooled), ``"flat"`` (whole output), ``"tokens"`` or ``"stats"``.

    ``form`` is the output's :class:`OutputFormat`, or its number of dimensions
    for the default format (channels-first maps, tokens with no class token).
    ``"tokens"`` summaries carry a class token ahead of the ``"stats"`` ones.
    """
    form = _as_format(form)
    if form.axes == "NC":
        return "vector"
    if pooling == "flatten":
        return "flat"
    return "tokens" if form.class_token else "stats"


def summarize(x: torch.Tensor, pooling: str, form: OutputFormat | None = None) -> torch.Tensor:
    """What :func:`pool` needs of one layer output, as ``(N, K)`` float32.

    ``form`` defaults to what the number of dimensions says (see :func:`summary_kind`).
    """
    form = _as_format(x.ndim if form is None else form)
    kind = summary_kind(form, pooling)
    x = x.float()
    if kind == "vector":
        return x
    if form.axes == "NHWC":
        x = x.permute(0, 3, 1, 2)  # channel-major, as every other map
    if kind == "flat":
        return x.flatten(1)
    if form.axes == "NTC":
        head, x, dims = x[:, 0], x[:, form.prefix_tokens:], (1,)
    else:
        head, dims = None, (2, 3)
    gem = x.clamp(min=GEM_EPS).pow(GEM_P).mean(dims).pow(1.0 / GEM_P)
    parts = [x.mean(dims), x.amax(dims), gem]
    return torch.cat(parts if kind == "stats" else [head, *parts], dim=1)


def pool(summary: np.ndarray, kind: str, pooling: str) -> np.ndarray:
    """Finish pooling from a :func:`summarize` output, as float32 ``(N, D)``."""
    summary = np.asarray(summary, dtype=np.float32)
    if kind not in ("stats", "tokens"):
        return summary
    if kind == "tokens":
        head, avg, high, gem = np.split(summary, 4, axis=1)
        if pooling == "cls":
            return head
        if pooling == "clsavg":
            return np.concatenate([head, avg], axis=1)
    else:
        avg, high, gem = np.split(summary, 3, axis=1)
        if pooling in TOKEN_POOLINGS:
            raise ValueError(f"pooling={pooling!r} needs a class token; this output has none. "
                             "Use a token layer of a model with a class token (a ViT block), "
                             "or 'avg', 'max', 'gem' or 'avgmax'.")
    if pooling == "avg":
        return avg
    if pooling == "max":
        return high
    if pooling == "gem":
        return gem
    if pooling == "avgmax":
        return np.concatenate([avg, high], axis=1)
    raise ValueError(f"Unknown pooling {pooling!r}; choose one of {POOLINGS}.")


def feature_names(layer: str, kind: str, pooling: str, width: int) -> list[str]:
    """Output column names of one layer whose summary is ``width`` wide."""
    if kind not in ("stats", "tokens"):
        return [f"{layer}_{i}" for i in range(width)]
    channels = width // (4 if kind == "tokens" else 3)
    parts = {"avgmax": ("avg", "max"), "clsavg": ("cls", "avg")}.get(pooling, (pooling,))
    return [f"{layer}_{p}_{i}" for p in parts for i in range(channels)]


def pool_into(out: np.ndarray, rows: Sequence[int], summaries: Sequence[np.ndarray],
              layouts: Sequence[LayerLayout], pooling: str) -> None:
    """Pool each layer's summaries and write them side by side into ``out[rows]``."""
    start = 0
    for layout, summary in zip(layouts, summaries, strict=True):
        pooled = pool(summary, layout.kind, pooling)
        out[rows, start:start + pooled.shape[1]] = pooled
        start += pooled.shape[1]
