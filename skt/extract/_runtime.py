"""The one extraction path both estimators run: batches -> engine -> summaries -> rows."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from skt.cache import FeatureCache, fingerprint
from skt.extract._engines import make_engine
from skt.extract._model import build_feature_model
from skt.images import Preprocessing, apply_orientation, dihedral_view, iter_batches
from skt.pooling import LayerLayout, pool_into

__all__ = ["FeatureRuntime", "extract_into", "readable_batches"]


def readable_batches(images: Sequence, preprocessing: Preprocessing, indices: Sequence[int],
                     batch_size: int, num_workers: int,
                     failures: dict[int, str] | None = None,
                     ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(rows, batch)``: the preprocessed images at ``indices``, batch by batch.

    With a ``failures`` dict, items that cannot be read are recorded there
    (see :func:`skt.images.iter_batches`) and left out of ``rows`` and
    ``batch``, as are items already in it; a batch with no item left yields
    nothing.
    """
    indices = list(indices)
    start = 0
    for batch in iter_batches(images, preprocessing, batch_size, num_workers, indices,
                              failures=failures):
        rows = indices[start:start + len(batch)]
        start += len(batch)
        if failures:
            keep = [k for k, row in enumerate(rows) if row not in failures]
            if not keep:
                continue
            batch, rows = batch[keep], [rows[k] for k in keep]
        yield rows, batch


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
    precision : {"float32", "float16", "bfloat16", "int8"}
        As settled by :func:`~skt.extract.resolve_precision`.
    graph_path : callable, optional
        ``graph_path(layout, precision)``: where the ONNX graph of that
        precision is kept, or None.
    threads : int, optional
        CPU threads of the network (see :func:`~skt.extract.make_engine`).
    calibration : dict, optional
        For ``precision="int8"``: what :func:`~skt.extract.calibrate` returned.
    reusable : callable, optional
        ``reusable(layout)``: stored float32 graphs that compute these layers
        among others, with our outputs' positions in theirs (see
        :class:`~skt.extract.OnnxEngine`); tried before a new export.

    Attributes
    ----------
    layout : list of LayerLayout
        One per layer: summary kind and width.
    engine : TorchEngine or OnnxEngine
    """

    def __init__(self, network: nn.Module, classifier: str | None,
                 preprocessing: Preprocessing, layers: list[str], pooling: str, *,
                 device: torch.device, engine: str = "torch", precision: str = "float32",
                 graph_path: Callable[[list[LayerLayout], str], Path | None] | None = None,
                 threads: int | None = None, calibration: dict | None = None,
                 reusable: Callable[[list[LayerLayout]], list] | None = None) -> None:
        size = preprocessing.crop_size
        model, self.layout = build_feature_model(copy.deepcopy(network), classifier, size,
                                                 layers, pooling)
        self.preprocessing = preprocessing
        def place(kind: str) -> Path | None:
            return None if graph_path is None else graph_path(self.layout, kind)

        reuse = (reusable(self.layout) if reusable is not None and precision == "float32"
                 and engine != "torch" else [])
        self.engine = make_engine(model, engine, device, size, precision, place(precision),
                                  threads, calibration=calibration,
                                  float_path=place("float32") if calibration else None,
                                  reuse=reuse)

    def summaries(self, images: Sequence, indices: Sequence[int], batch_size: int,
                  num_workers: int, views: Sequence[int] = (0,),
                  failures: dict[int, str] | None = None,
                  ) -> Iterator[tuple[list[int], list[np.ndarray]]]:
        """Yield ``(rows, summaries)`` for the images at ``indices``, batch by batch.

        With several ``views`` (:func:`skt.images.dihedral_view` numbers), each
        summary is the mean of the views' summaries, which is the mean of
        their features (every part of a summary is a feature): test-time
        augmentation. Each image is decoded once for all its views. ``failures``:
        as in :func:`readable_batches`.
        """
        for rows, batch in readable_batches(images, self.preprocessing, indices, batch_size,
                                            num_workers, failures):
            outputs = [self.engine(dihedral_view(batch, view)) for view in views]
            yield rows, [np.mean(parts, axis=0, dtype=np.float32) if len(parts) > 1 else parts[0]
                         for parts in zip(*outputs, strict=True)]


def extract_into(out: np.ndarray, images: Sequence, runtime: FeatureRuntime, pooling: str, *,
                 batch_size: int, num_workers: int, cache: FeatureCache | None = None,
                 description: dict[str, Any] | None = None, progress: Any = None,
                 views: Sequence[int] = (0,), failures: dict[int, str] | None = None,
                 ) -> np.ndarray:
    """Fill ``out`` (``(len(images), n_features)``) with the pooled features of ``images``.

    With ``cache``, items found under ``description`` are read, not computed
    (see :meth:`skt.cache.FeatureCache.serve`). ``progress`` is a tqdm bar or
    None. ``views`` averages summaries over views (see
    :meth:`FeatureRuntime.summaries`); with ``cache``, ``description`` must
    tell configurations with different views apart.

    ``failures`` None: the first item that cannot be read raises. A dict:
    such items are recorded as ``failures[index] = message`` (items already
    there, refused by :func:`skt.images.as_image_list`, are not read), their
    rows of ``out`` are NaN, and nothing of theirs goes into ``cache``, so
    they are tried again next time.
    """
    def emit(rows: Sequence[int], summaries: Sequence[np.ndarray]) -> None:
        pool_into(out, rows, summaries, runtime.layout, pooling)
        if progress is not None:
            progress.update(len(rows))

    def compute(indices: Sequence[int]):
        return runtime.summaries(images, indices, batch_size, num_workers, views, failures)

    live = [i for i in range(len(images)) if not failures or i not in failures]
    if cache is None:
        for rows, summaries in compute(live):
            emit(rows, summaries)
    else:
        _serve_cached(cache, description, images, live, runtime, compute, emit)
    if failures:
        failed = sorted(failures)
        out[failed] = np.nan
        if progress is not None:
            progress.update(len(failed))
    return out


def _serve_cached(cache: FeatureCache, description: dict[str, Any] | None, images: Sequence,
                  live: list[int], runtime: FeatureRuntime, compute, emit) -> None:
    """Run ``live`` items through ``cache``, keyed by content; compute the unkeyable ones.

    PIL images are keyed by their upright pixels, so an image with an EXIF
    Orientation tag does not share a key with its untagged twin. An item
    that cannot even be hashed (a closed PIL image, a file that vanished)
    is computed outside the cache, where reading it raises (or records) its
    own error naming it.
    """
    keys: dict[int, str] = {}
    for i in live:
        item = images[i]
        with contextlib.suppress(Exception):  # reading it below names the item and the cause
            keys[i] = fingerprint(apply_orientation(item) if isinstance(item, Image.Image)
                                  else item)
    keyed = list(keys)
    position = {i: j for j, i in enumerate(keyed)}

    def compute_keyed(local: Sequence[int]):
        for rows, summaries in compute([keyed[j] for j in local]):
            yield [position[i] for i in rows], summaries

    def emit_keyed(local: Sequence[int], summaries: Sequence[np.ndarray]) -> None:
        emit([keyed[j] for j in local], summaries)

    layers = [(layer.name, layer.kind) for layer in runtime.layout]
    cache.serve(description, layers, list(keys.values()), compute_keyed, emit_keyed)
    unkeyed = [i for i in live if i not in keys]
    if unkeyed:
        for rows, summaries in compute(unkeyed):
            emit(rows, summaries)
