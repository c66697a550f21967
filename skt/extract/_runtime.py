"""The one extraction path both estimators run: batches -> engine -> summaries -> rows."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from skt.cache import FeatureCache, fingerprint
from skt.extract._engines import make_engine
from skt.extract._model import build_feature_model
from skt.images import Preprocessing, dihedral_view, iter_batches
from skt.pooling import LayerLayout, pool_into

__all__ = ["FeatureRuntime", "extract_into"]


class FeatureRuntime:
    """A network ready to turn images into per-layer summaries in this process.

    Parameters
    ----------
    network : nn.Module
        The full network; it is copied, never modified.
    classifier : str or None
        Module name of its final linear layer (what ``"pre_logits"`` cuts off).
    preprocessing : Preprocessing
    layers : list of str
        Layer names (see :func:`skt.backbones.check_layers`).
    pooling : str
        Only ``"flatten"`` changes what runs; every other pooling is finished
        from the same summaries.
    device : torch.device
    engine : {"auto", "torch", "onnx"}
    dtype : str, optional
        Autocast precision on CUDA.
    graph_path : callable, optional
        ``graph_path(layout)``: where the exported ONNX graph is kept, or None.

    Attributes
    ----------
    layout : list of LayerLayout
        One per layer: summary kind and width.
    engine : TorchEngine or OnnxEngine
    """

    def __init__(self, network: nn.Module, classifier: str | None,
                 preprocessing: Preprocessing, layers: list[str], pooling: str, *,
                 device: torch.device, engine: str = "torch", dtype: str | None = None,
                 graph_path: Callable[[list[LayerLayout]], Path | None] | None = None) -> None:
        size = preprocessing.crop_size
        model, self.layout = build_feature_model(copy.deepcopy(network), classifier, size,
                                                 layers, pooling)
        self.preprocessing = preprocessing
        path = None if graph_path is None else graph_path(self.layout)
        self.engine = make_engine(model, engine, device, size, dtype, path)

    def summaries(self, images: Sequence, indices: Sequence[int], batch_size: int,
                  num_workers: int, views: Sequence[int] = (0,),
                  ) -> Iterator[tuple[list[int], list[np.ndarray]]]:
        """Yield ``(rows, summaries)`` for the images at ``indices``, batch by batch.

        With several ``views`` (:func:`skt.images.dihedral_view` numbers), each
        summary is the mean of the views' summaries: test-time augmentation,
        meant for flat layers such as logits.
        """
        indices = list(indices)
        start = 0
        for batch in iter_batches(images, self.preprocessing, batch_size, num_workers, indices):
            rows = indices[start:start + len(batch)]
            start += len(batch)
            outputs = [self.engine(dihedral_view(batch, view)) for view in views]
            yield rows, [np.mean(parts, axis=0, dtype=np.float32) if len(parts) > 1 else parts[0]
                         for parts in zip(*outputs, strict=True)]


def extract_into(out: np.ndarray, images: Sequence, runtime: FeatureRuntime, pooling: str, *,
                 batch_size: int, num_workers: int, cache: FeatureCache | None = None,
                 description: dict[str, Any] | None = None, progress: Any = None,
                 views: Sequence[int] = (0,)) -> np.ndarray:
    """Fill ``out`` (``(len(images), n_features)``) with the pooled features of ``images``.

    With ``cache``, items found under ``description`` are read, not computed
    (see :meth:`skt.cache.FeatureCache.serve`). ``progress`` is a tqdm bar or
    None. ``views`` averages summaries over views (see
    :meth:`FeatureRuntime.summaries`); not with ``cache``.
    """
    def emit(rows: Sequence[int], summaries: Sequence[np.ndarray]) -> None:
        pool_into(out, rows, summaries, runtime.layout, pooling)
        if progress is not None:
            progress.update(len(rows))

    def compute(indices: Sequence[int]):
        return runtime.summaries(images, indices, batch_size, num_workers, views)

    if cache is None:
        for rows, summaries in compute(range(len(images))):
            emit(rows, summaries)
        return out
    keys = [fingerprint(images[i]) for i in range(len(images))]
    layers = [(layer.name, layer.kind) for layer in runtime.layout]
    cache.serve(description, layers, keys, compute, emit)
    return out
