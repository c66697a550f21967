"""Decoding one item of any accepted kind into an RGB tensor.

Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images become RGB.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from skt.images._validate import describe_item

__all__ = ["load_image"]


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """RGB pixels of any PIL mode: uint8, or float in [0, 1] for 16/32-bit modes."""
    if image.mode.startswith("I;16") or image.mode == "I":
        gray = np.asarray(image, dtype=np.float32) / 65535.0
        return np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=2)
    if image.mode == "F":
        gray = np.asarray(image, dtype=np.float32)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))


def _draft_size(size: tuple[int, int], shorter_side: int) -> tuple[int, int]:
    scale = shorter_side / min(size)
    return math.ceil(size[0] * scale), math.ceil(size[1] * scale)


def load_image(item: Any, index: int = 0, draft: int | None = None) -> torch.Tensor:
    """Decode one item into an RGB ``(3, H, W)`` tensor (uint8, or float in [0, 1]).

    ``draft`` is a hint: JPEG files are decoded at the smallest power-of-two
    reduction whose shorter side is still at least ``draft`` pixels.
    """
    if isinstance(item, str | os.PathLike):
        try:
            with Image.open(item) as image:
                if draft is not None and image.format == "JPEG":
                    image.draft("RGB", _draft_size(image.size, draft))
                image.load()
                pixels = _pil_to_array(image)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            raise ValueError(f"{describe_item(index, item)} cannot be read as an image ({exc}). "
                             "The file may be truncated or not an image; re-create or remove "
                             "it.") from exc
    elif isinstance(item, Image.Image):
        pixels = _pil_to_array(item)
    else:
        pixels = item
    return _to_rgb_tensor(pixels)


def _to_rgb_tensor(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W) / (H, W, C) arrays and (H, W) / (C, H, W) tensors -> RGB (3, H, W)."""
    if isinstance(pixels, np.ndarray):
        if pixels.dtype == np.uint16:
            pixels = pixels.astype(np.float32) / 65535.0
        pixels = np.ascontiguousarray(pixels)
        if not pixels.flags.writeable:  # PIL's buffers are read-only; torch warns on those
            pixels = pixels.copy()
        tensor = torch.from_numpy(pixels)
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    else:
        tensor = pixels[None] if pixels.ndim == 2 else pixels
        if tensor.dtype == torch.uint16:
            tensor = tensor.to(torch.float32) / 65535.0
    if tensor.is_floating_point() and tensor.dtype != torch.float32:
        tensor = tensor.to(torch.float32)
    if tensor.shape[0] == 1:
        return tensor.expand(3, -1, -1)
    return tensor[:3]  # drops alpha


