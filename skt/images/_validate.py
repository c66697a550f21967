"""Cheap checks of every accepted image input, one clear error per bad item.

Accepted ``X``:

- a list (or tuple, 1-D array, pandas Series) of image file paths, PIL images,
  ``(H, W)`` / ``(H, W, C)`` arrays or ``(C, H, W)`` tensors, in any mix and of
  any sizes;
- a numeric array ``(N, H, W)`` or ``(N, H, W, C)`` with ``C`` in 1, 3, 4:
  ``uint8`` (0-255), ``uint16`` (0-65535) or float16/32/64 in [0, 1];
- a torch tensor ``(N, C, H, W)`` or ``(N, H, W)``, same dtypes and ranges
  (``bfloat16``, signed integers, ``bool`` and complex pixels are refused).

A bad item raises ``ValueError`` or ``TypeError`` naming its index (and path),
before or while it is read; nothing is skipped, so row ``i`` of any output
belongs to item ``i``. With a ``failures`` dict, errors of single items of a
list are recorded there instead, and the items stay in place (see
:func:`as_image_list`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["as_image_list", "check_pixel_values", "describe_item"]


def describe_item(index: int, item: Any) -> str:
    """``Image 3 ('/data/x.png')`` for paths, ``Image 3`` otherwise: how errors name items."""
    if isinstance(item, str | os.PathLike):
        return f"Image {index} ({os.fspath(item)!r})"
    return f"Image {index}"


def _as_numpy(data: np.ndarray | torch.Tensor) -> np.ndarray:
    return data.detach().cpu().numpy() if torch.is_tensor(data) else data


_TORCH_KINDS = {torch.uint8: "u", torch.uint16: "u", torch.float16: "f", torch.float32: "f",
                torch.float64: "f"}


def _pixel_kind(dtype: np.dtype | torch.dtype) -> str | None:
    """``"u"`` for uint8/uint16, ``"f"`` for float16/32/64 (either byte order), else None."""
    if isinstance(dtype, torch.dtype):
        return _TORCH_KINDS.get(dtype)
    if dtype.kind == "u" and dtype.itemsize <= 2:
        return "u"
    if dtype.kind == "f" and dtype.itemsize <= 8:
        return "f"
    return None


_RANGE_HINTS = {
    1: "float values outside [0, 1]; divide 0-255 data by 255 or pass uint8",
    65535: ("32-bit integer values outside [0, 65535]; skt reads PIL mode 'I' images as "
            "16-bit: rescale them to 0-65535, or pass floats in [0, 1]"),
}


def check_pixel_values(values: np.ndarray, where: str, *, batched: bool = False,
                       high: int = 1) -> None:
    """Refuse NaN, infinite and out-of-range pixels with one error naming the first bad image.

    The one value check of pixels that are not uint8 or uint16: float arrays
    and tensors (``high=1``), and decoded PIL images and files of float
    (mode ``"F"``, ``high=1``) and 32-bit integer pixels (mode ``"I"``,
    ``high=65535``). ``where`` names the image, or ``X`` for a stack
    (``batched``), whose first bad image is then named by its index.
    """
    axes = tuple(range(1, values.ndim)) if batched else None
    finite = np.isfinite(values).all(axis=axes)
    in_range = ((values >= 0) & (values <= high)).all(axis=axes)
    for problem, ok in (("contains NaN or infinite values; replace them (e.g. with "
                         "np.nan_to_num) or leave the image out", finite),
                        (f"has {_RANGE_HINTS[high]}", in_range)):
        if not np.all(ok):
            name = f"Image {int(np.flatnonzero(~ok)[0])}" if batched else where
            raise ValueError(f"{name} {problem}.")


def _check_pixels(data: np.ndarray | torch.Tensor, where: str, batched: bool) -> None:
    """Dtype, NaN and range checks for one image or a stack of them."""
    kind = _pixel_kind(data.dtype)
    if kind is None:
        raise TypeError(
            f"{where}: pixel dtype {data.dtype} is not supported. Use uint8 (0-255), uint16 "
            "(0-65535) or floats in [0, 1] (float16, float32 or float64), e.g. "
            "X.astype(np.uint8) or X / 255.0."
        )
    if kind == "f":
        check_pixel_values(_as_numpy(data), where, batched=batched)


def _check_array_image(item: np.ndarray | torch.Tensor, index: int) -> None:
    channels_first = torch.is_tensor(item)
    shape = tuple(item.shape)
    layout = "(C, H, W)" if channels_first else "(H, W, C)"
    if not (len(shape) == 2
            or (len(shape) == 3 and shape[0 if channels_first else 2] in (1, 3, 4))):
        raise ValueError(f"Image {index} has shape {shape}; expected (H, W) or {layout} "
                         "with 1, 3 or 4 channels.")
    if min(shape[-2:] if channels_first else shape[:2]) < 1:
        raise ValueError(f"Image {index} has shape {shape}, with no pixels.")
    _check_pixels(item, f"Image {index}", batched=False)


def _check_item(item: Any, index: int) -> None:
    if isinstance(item, str | os.PathLike):
        path = os.fspath(item)
        if not os.path.isfile(path):
            what = "is a directory, not an image file" if os.path.isdir(path) else "does not exist"
            raise ValueError(f"Image {index} ({path!r}): the file {what}. Check the path; "
                             "for a folder of class subfolders use skt.load_image_folder.")
    elif isinstance(item, Image.Image):
        if min(item.size) < 1:
            raise ValueError(f"Image {index} is an empty PIL image (size {item.size}).")
    elif isinstance(item, np.ndarray | torch.Tensor):
        _check_array_image(item, index)
    else:
        raise TypeError(f"Image {index} is a {type(item).__name__}; expected a file path, a "
                        "PIL image, an (H, W[, C]) array or a (C, H, W) tensor.")


def as_image_list(X: Any, *, failures: dict[int, str] | None = None) -> Sequence:
    """Validate ``X`` and return it as a sequence of N single images.

    Cheap checks only: types, shapes, dtypes, NaN, value range, that files
    exist. Files are decoded later, by :func:`load_image`.

    Parameters
    ----------
    X : images
        See :mod:`skt.images._validate` for what is accepted.
    failures : dict, optional
        None (default): the first bad item raises. A dict: an item of a list
        that fails its own check (its type, shape, dtype, pixel values, a
        missing file) is recorded as ``failures[index] = message`` and kept
        in place, so indices still match ``X``. Errors about ``X`` as a
        whole raise either way: its type, an empty ``X``, and the shape,
        dtype or values of a stacked array or tensor.

    Returns
    -------
    images : sequence
        A list of items, or the stacked array or tensor itself.

    Examples
    --------
    >>> import numpy as np
    >>> from skt.images import as_image_list
    >>> len(as_image_list(np.zeros((5, 32, 32, 3), dtype=np.uint8)))
    5
    >>> as_image_list(np.zeros((2, 8, 8), dtype=np.int64))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: X: pixel dtype int64 is not supported. Use uint8 (0-255), uint16 (0-65535) ...
    >>> failures = {}
    >>> len(as_image_list([np.zeros((8, 8), np.uint8), "missing.png"], failures=failures))
    2
    >>> failures[1]  # doctest: +ELLIPSIS
    "Image 1 ('missing.png'): the file does not exist. ..."
    """
    if hasattr(X, "iloc"):  # pandas: a Series, or a DataFrame of one column
        if getattr(X, "ndim", 1) == 2:
            if X.shape[1] != 1:
                raise ValueError(f"X is a DataFrame with {X.shape[1]} columns; pass the one "
                                 "column that holds the images.")
            X = X.iloc[:, 0]
        X = X.tolist()
    if isinstance(X, str | os.PathLike | Image.Image):
        raise TypeError(
            "X is a single image or path; pass a list of images (e.g. [X]). For a folder of "
            "class subfolders use paths, labels = skt.load_image_folder(folder)."
        )
    if isinstance(X, bytes | bytearray):
        raise TypeError("X is bytes; pass a list of images. For the bytes of an encoded image "
                        "file, pass [PIL.Image.open(io.BytesIO(X))].")
    if isinstance(X, np.ndarray | torch.Tensor) and X.ndim == 0:
        raise ValueError("X has shape (), a single value; expected a list of images, an array "
                         "(N, H, W[, C]) or a tensor (N, C, H, W).")
    if isinstance(X, np.ndarray | torch.Tensor) and X.dtype not in (np.object_,) and not (
        isinstance(X, np.ndarray) and X.dtype.kind in "US"
    ):
        return _as_batch(X)
    if not isinstance(X, Sequence | np.ndarray):
        raise TypeError(f"X is a {type(X).__name__}; expected a list of images, an array "
                        "(N, H, W[, C]) or a tensor (N, C, H, W).")
    items = list(X)
    if not items:
        raise ValueError("X is empty: there are no images to process.")
    for index, item in enumerate(items):
        if isinstance(item, np.str_):
            items[index] = item = str(item)
        try:
            _check_item(item, index)
        except (ValueError, TypeError) as exc:
            if failures is None:
                raise
            failures[index] = str(exc)
    return items


def _as_batch(X: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    is_tensor = torch.is_tensor(X)
    shape = tuple(X.shape)
    if shape[0] == 0:
        raise ValueError("X is empty: there are no images to process.")
    layout = "(N, C, H, W) or (N, H, W)" if is_tensor else "(N, H, W) or (N, H, W, C)"
    channels = None if len(shape) != 4 else (shape[1] if is_tensor else shape[3])
    if len(shape) not in (3, 4) or (channels is not None and channels not in (1, 3, 4)):
        hint = (" A 2-D array is read as N flattened images, which skt cannot reshape: "
                "reshape it to (N, H, W) first." if len(shape) == 2 else "")
        raise ValueError(f"X has shape {shape}; expected {layout} with 1, 3 or 4 channels.{hint}")
    height, width = shape[-2:] if is_tensor else shape[1:3]
    if min(height, width) < 1:
        raise ValueError(f"X has shape {shape}: its images have no pixels ({height} x {width}).")
    _check_pixels(X, "X", batched=True)
    return X
