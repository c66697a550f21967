"""Every accepted image input, validated and turned into normalised tensors.

Accepted ``X``:

- a list (or tuple, 1-D array, pandas Series) of image file paths, PIL images,
  ``(H, W)`` / ``(H, W, C)`` arrays or ``(C, H, W)`` tensors, in any mix and of
  any sizes;
- a numeric array ``(N, H, W)`` or ``(N, H, W, C)`` with ``C`` in 1, 3, 4:
  ``uint8`` (0-255), ``uint16`` (0-65535) or float in [0, 1];
- a torch tensor ``(N, C, H, W)`` or ``(N, H, W)``, same dtypes and ranges.

Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images become RGB.
A bad item raises ``ValueError`` or ``TypeError`` naming its index (and path),
before or while it is read; nothing is skipped, so row ``i`` of any output
belongs to item ``i``.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from skt.backbones import Preprocessing

__all__ = [
    "AUGMENTATIONS",
    "ImageDataset",
    "as_image_list",
    "fingerprint",
    "list_image_files",
    "load_image",
    "load_image_folder",
    "preprocess",
]

_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
_INT_MAX = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}


def _describe(index: int, item: Any) -> str:
    if isinstance(item, str | os.PathLike):
        return f"Image {index} ({os.fspath(item)!r})"
    return f"Image {index}"


def _as_numpy(data: np.ndarray | torch.Tensor) -> np.ndarray:
    return data.detach().cpu().numpy() if torch.is_tensor(data) else data


def _check_pixels(data: np.ndarray | torch.Tensor, where: str, batched: bool) -> None:
    """Dtype, NaN and range checks for one image or a stack of them."""
    array = _as_numpy(data)
    dtype = array.dtype
    if dtype in _INT_MAX:
        return
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{where}: pixel dtype {dtype} is not supported. Use uint8 (0-255), uint16 "
            "(0-65535) or floats in [0, 1], e.g. X.astype(np.uint8) or X / 255.0."
        )
    axes = tuple(range(1, array.ndim)) if batched else None
    finite = np.isfinite(array).all(axis=axes)
    in_range = ((array >= 0) & (array <= 1)).all(axis=axes)
    for problem, ok in (("contains NaN or infinite values", finite),
                        ("has float values outside [0, 1]", in_range)):
        if not np.all(ok):
            first = int(np.flatnonzero(~np.atleast_1d(ok))[0]) if batched else None
            name = f"Image {first}" if batched else where
            hint = "" if "NaN" in problem else "; divide 0-255 data by 255 or pass uint8"
            raise ValueError(f"{name} {problem}{hint}.")


def _check_array_image(item: np.ndarray | torch.Tensor, index: int) -> None:
    channels_first = torch.is_tensor(item)
    shape = tuple(item.shape)
    channels = shape[0] if channels_first else shape[-1]
    layout = "(C, H, W)" if channels_first else "(H, W, C)"
    if not (len(shape) == 2 or (len(shape) == 3 and channels in (1, 3, 4))):
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


def as_image_list(X: Any) -> Sequence:
    """Validate ``X`` and return it as a sequence of N single images.

    Cheap checks only: types, shapes, dtypes, NaN, value range, that files
    exist. Files are decoded later, by :func:`load_image`.

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
        _check_item(item, index)
    return items


def _as_batch(X: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    is_tensor = torch.is_tensor(X)
    shape = tuple(X.shape)
    if len(shape) == 0 or shape[0] == 0:
        raise ValueError("X is empty: there are no images to process.")
    layout = "(N, C, H, W) or (N, H, W)" if is_tensor else "(N, H, W) or (N, H, W, C)"
    channels = None if len(shape) != 4 else (shape[1] if is_tensor else shape[3])
    if len(shape) not in (3, 4) or (channels is not None and channels not in (1, 3, 4)):
        hint = (" A 2-D array is read as N flattened images, which skt cannot reshape: "
                "reshape it to (N, H, W) first." if len(shape) == 2 else "")
        raise ValueError(f"X has shape {shape}; expected {layout} with 1, 3 or 4 channels.{hint}")
    _check_pixels(X, "X", batched=True)
    return X


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
            raise ValueError(f"{_describe(index, item)} cannot be read as an image ({exc}). "
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


AUGMENTATIONS = (None, "flip", "standard")


def _finish(image: torch.Tensor, config: Preprocessing) -> torch.Tensor:
    image = TF.to_dtype(image, torch.float32, scale=True)
    if config.interpolation != "nearest":
        image = image.clamp(0, 1)  # bicubic overshoots
    return TF.normalize(image, config.mean, config.std)


def preprocess(image: torch.Tensor, config: Preprocessing, augment: str | None = None,
               ) -> torch.Tensor:
    """Resize, crop and normalise one ``(3, H, W)`` image.

    ``augment=None`` is the evaluation transform: resize the shorter side,
    centre-crop. ``"flip"`` adds a random horizontal flip; ``"standard"`` is a
    random resized crop (scale 0.25-1, aspect 3/4-4/3) plus a flip. Random
    draws come from torch's global generator.
    """
    interpolation = TF.InterpolationMode(config.interpolation)
    if augment == "standard":
        top, left, height, width = T.RandomResizedCrop.get_params(
            image, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3))
        image = TF.resized_crop(image, top, left, height, width,
                                [config.crop_size, config.crop_size],
                                interpolation=interpolation, antialias=True)
    else:
        image = TF.resize(image, config.resize_size, interpolation=interpolation, antialias=True)
        image = TF.center_crop(image, config.crop_size)
    if augment in ("flip", "standard") and torch.rand(()) < 0.5:
        image = TF.horizontal_flip(image)
    return _finish(image, config)


@dataclass
class _Failure:
    message: str


class ImageDataset(torch.utils.data.Dataset):
    """Validated images as a map-style dataset of preprocessed tensors.

    Decoding errors are returned, not raised, so that a DataLoader worker
    hands them to the main process intact; :func:`collate` raises them there.
    """

    def __init__(self, images: Sequence, config: Preprocessing,
                 indices: Sequence[int] | None = None, augment: str | None = None) -> None:
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment={augment!r}; choose one of {AUGMENTATIONS}.")
        self.images = images
        self.config = config
        self.augment = augment
        self.indices = list(range(len(images))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> torch.Tensor | _Failure:
        index = self.indices[position]  # errors name the item's index in X
        try:
            image = load_image(self.images[index], index, draft=self.config.resize_size)
            return preprocess(image, self.config, self.augment)
        except ValueError as exc:
            return _Failure(str(exc))


def collate(batch: list[torch.Tensor | _Failure]) -> torch.Tensor:
    """Stack a batch, raising the first decoding error with its message."""
    for item in batch:
        if isinstance(item, _Failure):
            raise ValueError(item.message)
    return torch.stack(batch)


_FILE_HASHES: dict[tuple, str] = {}


def _file_fingerprint(path: str | os.PathLike) -> str:
    # Within one process a file whose inode, size and nanosecond modification
    # time are unchanged keeps its hash: GridSearchCV asks dozens of times.
    stat = os.stat(path)
    identity = (os.fspath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    known = _FILE_HASHES.get(identity)
    if known is None:
        digest = hashlib.blake2b(b"file", digest_size=16)
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        if len(_FILE_HASHES) > 1_000_000:
            _FILE_HASHES.clear()
        known = _FILE_HASHES[identity] = digest.hexdigest()
    return known


def fingerprint(item: Any) -> str:
    """Content hash of one image: file bytes for paths, pixels otherwise.

    Paths are keyed by content rather than by name and modification time, so a
    file rewritten in place never returns stale features, and copies or moved
    files still hit. A process remembers the hash of a file until its inode,
    size or modification time changes.
    """
    if isinstance(item, str | os.PathLike):
        return _file_fingerprint(item)
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(item, Image.Image):
        digest.update(f"pil|{item.mode}|{item.size}".encode())
        digest.update(item.tobytes())
    else:
        array = np.ascontiguousarray(_as_numpy(item))
        layout = "chw" if torch.is_tensor(item) else "hwc"
        digest.update(f"array|{layout}|{array.dtype}|{array.shape}".encode())
        digest.update(array.data)
    return digest.hexdigest()


def list_image_files(folder: str | os.PathLike) -> list[str]:
    """Sorted paths of the image files directly inside ``folder``."""
    folder = Path(folder)
    return sorted(str(p) for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def load_image_folder(root: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Image paths and class labels of a folder laid out as ``root/<class>/<image>``.

    Returns
    -------
    paths : list of str
        Image files, sorted by class then name.
    labels : ndarray of str
        The subfolder name of each file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> from skt import load_image_folder
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for label in ("cat", "dog"):
    ...     (root / label).mkdir()
    ...     Image.new("RGB", (8, 8)).save(root / label / "a.png")
    >>> paths, labels = load_image_folder(root)
    >>> labels.tolist()
    ['cat', 'dog']
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{str(root)!r} is not a directory.")
    try:
        classes, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as exc:
        raise ValueError(f"{str(root)!r} is not in class-subfolder layout "
                         f"(root/<class>/<image>): {exc}") from exc
    paths = [path for path, _ in samples]
    labels = np.array([classes[target] for _, target in samples])
    return paths, labels
