"""Image files of a folder, and folders laid out as one subfolder per class."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

__all__ = ["list_image_files", "load_image_folder"]


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
