"""Decoding one item of any accepted kind into an RGB tensor.

Grayscale, palette, RGBA (alpha dropped), premultiplied ``La`` / ``RGBa``,
CMYK, YCbCr, LAB and HSV images become RGB; 16-bit images (``I;16``) become
floats in [0, 1]. Float images (mode ``F``) must hold values in [0, 1] and
32-bit integer images (mode ``I``) values in 0-65535, read as 16-bit; NaN,
infinities and values out of range are refused as they are for arrays
(:func:`check_pixel_values`).

Files and PIL images are turned upright as their EXIF Orientation tag says
(:func:`PIL.ImageOps.exif_transpose`), as image viewers show them: a photo
taken with the camera on its side comes out the way it was held. A PIL
image given directly is left as it was (a turned copy is used), and one
already turned has no tag left, so nothing is turned twice. Arrays and
tensors have no tag and are used as they are. A JPEG ``draft`` is applied
before the turn; it scales both sides alike, so the shorter side is still at
least ``draft`` pixels after a quarter turn.

Every problem reading an item is a ``ValueError`` naming it: a damaged or
truncated file, a closed PIL image or one opened lazily from a damaged file,
a mode that cannot become RGB, and an image larger than
``PIL.Image.MAX_IMAGE_PIXELS`` (a possible decompression bomb), whose message
says how to raise that limit.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from skt.images._validate import check_pixel_values, describe_item

__all__ = ["apply_orientation", "load_image"]


def apply_orientation(image: Image.Image) -> Image.Image:
    """``image`` turned upright as its EXIF Orientation tag says, or ``image`` itself.

    :func:`PIL.ImageOps.exif_transpose` when the tag asks for a turn or flip,
    which returns a turned copy without the tag; ``image`` is left as it was.

    Examples
    --------
    >>> from PIL import Image
    >>> from skt.images import apply_orientation
    >>> image = Image.new("L", (4, 3))
    >>> image.getexif()[0x0112] = 6  # Orientation: turn a quarter clockwise to view
    >>> apply_orientation(image).size, image.size
    ((3, 4), (4, 3))
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def _pil_pixels(image: Image.Image) -> np.ndarray:
    """Pixels of an upright image: ``(H, W)`` as stored for 16/32-bit and float modes, else RGB."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return np.asarray(image)
    if image.mode == "La":  # PIL converts premultiplied La to LA only
        image = image.convert("LA")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))


def _in_unit_range(pixels: np.ndarray, where: str) -> np.ndarray:
    """Decoded pixels as uint8, uint16 or floats in [0, 1]; bad values refused."""
    if pixels.dtype.kind == "i":  # mode "I": 32-bit integers, read as 16-bit
        check_pixel_values(pixels, where, high=65535)
        return pixels.astype(np.uint16)
    if pixels.dtype.kind == "f":
        check_pixel_values(pixels, where)
    return pixels


def _draft_size(size: tuple[int, int], shorter_side: int) -> tuple[int, int]:
    scale = shorter_side / min(size)
    return math.ceil(size[0] * scale), math.ceil(size[1] * scale)


@contextlib.contextmanager
def _reading(where: str, hint: str) -> Iterator[None]:
    """Turn whatever PIL raises while reading an item into a ValueError naming it."""
    try:
        yield
    except Image.DecompressionBombError as exc:
        raise ValueError(
            f"{where} is too large to decode safely ({str(exc).rstrip('.')}). If you trust "
            "it, raise PIL's limit first: PIL.Image.MAX_IMAGE_PIXELS = <pixels> (None for "
            "no limit)."
        ) from exc
    except Exception as exc:  # a damaged file can make a decoder raise anything
        raise ValueError(f"{where} cannot be read as an image ({exc}). {hint}") from exc


_FILE_HINT = "The file may be truncated or not an image; re-create or remove it."
_PIL_HINT = ("Pass PIL images that are open and loaded (call image.load() before closing "
             "their file, or pass image.copy()), or the paths of their files.")


def load_image(item: Any, index: int = 0, draft: int | None = None) -> torch.Tensor:
    """Decode one item into an RGB ``(3, H, W)`` tensor (uint8, or float in [0, 1]).

    Files and PIL images come out upright (EXIF orientation applied). ``draft``
    is a hint: JPEG files are decoded at the smallest power-of-two reduction
    whose shorter side is still at least ``draft`` pixels.
    """
    where = describe_item(index, item)
    if isinstance(item, str | os.PathLike):
        with _reading(where, _FILE_HINT), Image.open(item) as image:
            if draft is not None and image.format == "JPEG":
                image.draft("RGB", _draft_size(image.size, draft))
            ImageOps.exif_transpose(image, in_place=True)  # our own copy: no need for another
            pixels = _pil_pixels(image)
    elif isinstance(item, Image.Image):
        source = getattr(item, "filename", "")
        if source:
            where = f"{where} (a PIL image opened from {source!r})"
        with _reading(where, _PIL_HINT):
            pixels = _pil_pixels(apply_orientation(item))
    else:
        return _to_rgb_tensor(item)
    if min(pixels.shape[:2]) < 1:
        raise ValueError(f"{where} decodes to an image with no pixels (shape {pixels.shape}); "
                         "re-create or remove it.")
    return _to_rgb_tensor(_in_unit_range(pixels, where))


def _to_rgb_tensor(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W) / (H, W, C) arrays and (H, W) / (C, H, W) tensors -> RGB (3, H, W)."""
    if isinstance(pixels, np.ndarray):
        if not pixels.dtype.isnative:  # e.g. big-endian 16-bit files: torch wants native order
            pixels = pixels.astype(pixels.dtype.newbyteorder("="))
        if pixels.dtype == np.uint16:
            pixels = pixels.astype(np.float32) / 65535.0
        pixels = np.ascontiguousarray(pixels)
        if not pixels.flags.writeable:  # PIL's buffers are read-only; torch warns on those
            pixels = pixels.copy()
        tensor = torch.from_numpy(pixels)
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    else:
        tensor = pixels.detach().cpu()
        tensor = tensor[None] if tensor.ndim == 2 else tensor
        if tensor.dtype == torch.uint16:
            tensor = tensor.to(torch.float32) / 65535.0
    if tensor.is_floating_point() and tensor.dtype != torch.float32:
        tensor = tensor.to(torch.float32)
    if tensor.shape[0] == 1:
        return tensor.expand(3, -1, -1)
    return tensor[:3]  # drops alpha
