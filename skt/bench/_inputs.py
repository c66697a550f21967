"""What rows read: the images, or something computed once from all of them."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from sklearn.base import clone

from skt._utils import expand_path, resolve_num_workers
from skt.cache import cache_info
from skt.extractor import FeatureExtractor
from skt.images import Preprocessing, as_image_list, iter_batches, load_image

__all__ = ["Input", "downsample", "feature_input", "pixel_input"]

@dataclass
class Input:
    """What rows read, computed once from all images.

    Parameters
    ----------
    name : str
        The key rows use in ``Row.input``.
    prepare : callable
        ``prepare(images) -> (X, note)``: the rows' input for all images (row
        ``i`` of ``X`` for image ``i``; an array, or a list such as the images
        themselves) and a one-line note on how it was computed.
    description : str
        What it is, printed before it is computed.
    """

    name: str
    prepare: Callable[[Any], tuple[Any, str]]
    description: str = ""


def downsample(images: Any, size: int | None = 32) -> np.ndarray:
    """Raw pixels as feature rows: each image resized to ``size`` x ``size``, in [0, 1].

    Images whose three channels are equal everywhere (grayscale) keep one
    channel, so a row has ``size * size`` values, else ``3 * size * size``.

    Parameters
    ----------
    images : images
        Anything :mod:`skt.images` accepts.
    size : int or None, default=32
        The shorter side is resized to ``size`` (bilinear, antialiased), then
        the centre ``size`` x ``size`` square is kept; image files are decoded
        by decoding threads. None keeps the pixels as they are: the images
        must then share one size.

    Returns
    -------
    ndarray of shape (n_images, n_pixels), dtype float32

    Examples
    --------
    >>> import numpy as np
    >>> from skt.bench import downsample
    >>> downsample(np.full((3, 64, 64), 255, dtype=np.uint8), size=8).shape
    (3, 64)
    >>> float(downsample(np.full((1, 4, 4, 3), 255, dtype=np.uint8), size=None).max())
    1.0
    """
    items = as_image_list(images)
    if size is None:
        batches = [_as_is(items)]
    else:
        config = Preprocessing(crop_size=size, resize_size=size, mean=(0.0, 0.0, 0.0),
                               std=(1.0, 1.0, 1.0), interpolation="bilinear")
        batches = list(iter_batches(items, config, 256, resolve_num_workers(None)))
    stack = torch.cat(batches).clamp(0, 1)
    if bool((stack == stack[:, :1]).all()):
        stack = stack[:, :1]
    return stack.flatten(1).numpy()


def _as_is(items) -> torch.Tensor:
    pixels = []
    for index in range(len(items)):
        image = TF.to_dtype(load_image(items[index], index), torch.float32, scale=True)
        if pixels and image.shape != pixels[0].shape:
            raise ValueError(f"Image {index} is {tuple(image.shape[1:])} pixels but image 0 "
                             f"is {tuple(pixels[0].shape[1:])}; pass a size to resize them "
                             "all to one.")
        pixels.append(image)
    return torch.stack(pixels)


def pixel_input(size: int | None = 32, name: str = "pixels") -> Input:
    """Downsampled raw pixels (:func:`downsample`) as an :class:`Input`."""
    shown = "as they are" if size is None else f"resized to {size}x{size}"
    description = f"raw pixels {shown}, scaled to [0, 1]"

    def prepare(images):
        pixels = downsample(images, size)
        return pixels, f"{description}, {pixels.shape[1]} values per image"

    return Input(name, prepare, description)


def _count_entries(cache: str | os.PathLike) -> int:
    return cache_info(cache)["entries"] if expand_path(cache).is_dir() else 0


def feature_input(extractor: FeatureExtractor, name: str | None = None) -> Input:
    """Fill ``extractor``'s feature cache with every image; rows then read the images.

    The rows of :func:`feature_rows` put a clone of ``extractor`` in a
    pipeline; with a warm cache their grid searches read features instead of
    running the backbone. The extraction time (or the cache reading time,
    when a previous run already filled it) is charged to those rows.

    Parameters
    ----------
    extractor : FeatureExtractor
        Unfitted, with ``cache`` set.
    name : str, optional
        Input name; default the backbone name.
    """
    if extractor.cache is None:
        raise ValueError("feature_input needs FeatureExtractor(cache=...): the rows' grid "
                         "searches read the features from the cache.")
    name = name or str(extractor.backbone)

    def prepare(images):
        before = _count_entries(extractor.cache)
        fitted = clone(extractor).fit(images)
        fitted.transform(images)
        added = _count_entries(extractor.cache) - before
        source = (f"computed by the {fitted.engine_} engine" if added
                  else "read from the cache of an earlier run")
        return images, (f"{name} at {fitted.preprocessing_.crop_size} px, "
                        f"{fitted.n_features_out_} features, {source}")

    return Input(name, prepare, f"{name} features into the cache {extractor.cache}")
