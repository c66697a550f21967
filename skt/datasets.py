"""Benchmark image data sets as :class:`sklearn.utils.Bunch` objects.

Every loader returns ``images`` (a ``uint8`` array, or file paths where the
data set ships as files) and an integer ``target`` aligned row by row, plus a
``DESCR`` that says where the data come from, whom to cite and its licence.
``images`` goes straight into :class:`skt.FeatureExtractor`; :func:`subsample`
takes a stratified subset of any of these bunches.

Data that no pip package ships (Fashion-MNIST) are read from a data folder:
``data_home=``, else the ``SKT_DATA`` environment variable, else
``~/skt_data``, as scikit-learn does with ``SCIKIT_LEARN_DATA``. Nothing is
downloaded.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.utils import Bunch

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FOLDER",
    "load_digits_images",
    "load_elpv",
    "load_fashion_mnist",
    "subsample",
]

FASHION_MNIST_FOLDER = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the IDX files, searched last."""

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_ELPV_DESCR = """\
ELPV: electroluminescence images of solar cells
-----------------------------------------------

2,624 grayscale 300x300 images of functional and defective cells cut from 44
photovoltaic modules (mono- and polycrystalline), each rated by experts with
a defect probability of 0, 1/3, 2/3 or 1. ``target`` is 1 (defective) where
the probability is at least ``threshold``; at 0.5 there are 1,803 working
and 821 defective cells.

Please cite:

- Buerhop-Lutz, C., Deitsch, S., Maier, A., Gallwitz, F., Berger, S.,
  Doll, B., Hauch, J., Camus, C. & Brabec, C. J., "A Benchmark for Visual
  Identification of Defective Solar Cells in Electroluminescence Imagery",
  European PV Solar Energy Conference and Exhibition (EU PVSEC), 2018.
  doi:10.4229/35thEUPVSEC20182018-5CV.3.15 (the data set).
- Deitsch, S., Christlein, V., Berger, S., Buerhop-Lutz, C., Maier, A.,
  Gallwitz, F. & Riess, C., "Automatic classification of defective
  photovoltaic module cells in electroluminescence images",
  Solar Energy 185 (2019) 455-468. doi:10.1016/j.solener.2019.02.067.

Licence: CC BY-NC-SA 4.0 (Creative Commons Attribution-NonCommercial-ShareAlike
4.0 International): the data are for research and other non-commercial use.
Read from the ``elpv-dataset`` package.
"""

_FASHION_DESCR = """\
Fashion-MNIST
-------------

70,000 grayscale 28x28 images of Zalando article photos in 10 classes, split
into the official 60,000 training and 10,000 test images; pixel values are
0 (background) to 255.

Please cite: Xiao, H., Rasul, K. & Vollgraf, R., "Fashion-MNIST: a Novel
Image Dataset for Benchmarking Machine Learning Algorithms", arXiv:1708.07747
(2017).

Licence: MIT, copyright 2017 Zalando SE.
"""

_DIGITS_DESCR = """\
Digits, as images
-----------------

scikit-learn's ``load_digits``: 1,797 handwritten digits 0-9 on an 8x8 grid
with values 0-16, from the UCI ML hand-written digits data set (Alpaydin, E.
& Kaynak, C., 1998; CC BY 4.0). Here values are scaled to 0-255 and the
images are upsampled bilinearly.
"""


# --------------------------------------------------------------------- ELPV --

def _elpv_folder() -> Path:
    try:
        import elpv_dataset
    except ImportError as exc:
        raise ImportError(
            "load_elpv needs the elpv-dataset package: pip install elpv-dataset "
            "(or pip install 'skt[bench]')."
        ) from exc
    return Path(elpv_dataset.__file__).resolve().parent / "data"


def _read_elpv_labels(labels: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """File names, defect probabilities and cell types from ``labels.csv``."""
    if not labels.is_file():
        raise FileNotFoundError(
            f"{str(labels)!r} does not exist; the elpv-dataset install is incomplete. "
            "Re-install it: pip install --force-reinstall elpv-dataset."
        )
    names, probabilities, types = [], [], []
    with open(labels, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3:
                raise ValueError(
                    f"{str(labels)!r} line {line_number}: expected 'path probability type', "
                    f"got {line.strip()!r}."
                )
            names.append(fields[0])
            probabilities.append(float(fields[1]))
            types.append(fields[2])
    return names, np.array(probabilities), np.array(types)


def _read_gray(path: str, shape: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as image:
        pixels = np.asarray(image)
    if pixels.shape != shape or pixels.dtype != np.uint8:
        raise ValueError(
            f"{path!r} holds a {pixels.dtype} image of shape {pixels.shape}, not the "
            f"uint8 {shape} grayscale cell the data set promises; re-install elpv-dataset."
        )
    return pixels


def load_elpv(threshold: float = 0.5, return_paths: bool = False) -> Bunch:
    """Load the ELPV solar-cell electroluminescence data set.

    2,624 grayscale 300x300 images of solar cells from the ``elpv-dataset``
    package (``pip install elpv-dataset`` or ``pip install 'skt[bench]'``),
    each with an expert defect probability of 0, 1/3, 2/3 or 1.

    Parameters
    ----------
    threshold : float, default=0.5
        A cell is defective (``target`` 1) when its defect probability is at
        least ``threshold``; must lie in [0, 1]. At 0.5 there are 1,803
        working and 821 defective cells.
    return_paths : bool, default=False
        Return absolute PNG paths instead of decoded pixels. Decoding all
        images takes a few seconds; paths let :class:`skt.FeatureExtractor`
        read lazily and let its feature cache key by file.

    Returns
    -------
    data : :class:`sklearn.utils.Bunch`
        images : ndarray of shape (2624, 300, 300) and dtype uint8, or list of str
            The cells, or their file paths when ``return_paths=True``.
        target : ndarray of shape (2624,) and dtype int64
            1 for a defective cell, 0 for a working one.
        probability : ndarray of shape (2624,) and dtype float64
            The experts' defect probability.
        cell_type : ndarray of shape (2624,) and dtype str
            ``"mono"`` or ``"poly"`` (crystalline silicon type).
        DESCR : str
            Description, citations and licence (CC BY-NC-SA 4.0, non-commercial).

    Raises
    ------
    ImportError
        If ``elpv-dataset`` is not installed.

    Examples
    --------
    >>> import numpy as np
    >>> from skt.datasets import load_elpv
    >>> elpv = load_elpv(return_paths=True)
    >>> len(elpv.images), np.bincount(elpv.target).tolist()
    (2624, [1803, 821])
    >>> np.unique(elpv.cell_type).tolist()
    ['mono', 'poly']
    """
    if isinstance(threshold, bool) or not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(
            f"threshold must be a probability in [0, 1]; got {threshold!r}. The defect "
            "probabilities are 0, 1/3, 2/3 and 1, so 0.5 splits them in half."
        )
    folder = _elpv_folder()
    names, probability, cell_type = _read_elpv_labels(folder / "labels.csv")
    paths = [str(folder / name) for name in names]
    if return_paths:
        images: np.ndarray | list[str] = paths
    else:
        images = np.empty((len(paths), 300, 300), dtype=np.uint8)
        for i, path in enumerate(paths):
            images[i] = _read_gray(path, (300, 300))
    return Bunch(
        images=images,
        target=(probability >= threshold).astype(np.int64),
        probability=probability,
        cell_type=cell_type,
        DESCR=_ELPV_DESCR,
    )


# ------------------------------------------------------------ Fashion-MNIST --

# A small IDX parser rather than torchvision.datasets.mnist.read_image_file: that one opens
# plain paths only (no gzip), checks with bare asserts and skips the size check on images.
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                  "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_FASHION_URL = "https://github.com/zalandoresearch/fashion-mnist/tree/master/data/fashion"


def _data_home(data_home: str | os.PathLike | None) -> Path:
    """``data_home``, else ``$SKT_DATA``, else ``~/skt_data``; ``~`` expanded."""
    if data_home is None:
        data_home = os.environ.get("SKT_DATA") or Path("~", "skt_data")
    return Path(data_home).expanduser()


def _fashion_folders(data_home: str | os.PathLike | None) -> list[Path]:
    """Folders that may hold the IDX files, in search order."""
    home = _data_home(data_home)
    # skt's layout, torchvision's FashionMNIST(root=home), and the bare files.
    folders = [home / "fashion-mnist", home / "FashionMNIST" / "raw", home]
    if data_home is None:
        folders.append(FASHION_MNIST_FOLDER)
    return list(dict.fromkeys(folders))


def _find_fashion_folder(data_home: str | os.PathLike | None) -> Path:
    """The first folder in search order holding any of the four IDX files."""
    folders = _fashion_folders(data_home)
    for folder in folders:
        if any((folder / name).is_file() or (folder / f"{name}.gz").is_file()
               for name in _FASHION_FILES):
            return folder
    searched = "".join(f"\n  {folder}" for folder in folders)
    raise FileNotFoundError(
        f"Fashion-MNIST not found: none of its IDX files is in any of{searched}\n"
        "Get the data in one of two ways:\n"
        "  - apt-get install dataset-fashion-mnist (Debian, Ubuntu) fills "
        f"{FASHION_MNIST_FOLDER}, searched when data_home=None;\n"
        f"  - download {', '.join(f'{name}.gz' for name in _FASHION_FILES)} from "
        f"{_FASHION_URL} into {_data_home(data_home) / 'fashion-mnist'}, or into any "
        "folder and pass it as data_home= (or set SKT_DATA to it)."
    )


def _find_idx(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Neither {name!r} nor {name + '.gz'!r} is in {str(folder)!r}, which holds other "
        f"Fashion-MNIST files; download {name + '.gz'!r} from {_FASHION_URL} into it."
    )


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when they are gzip data, whatever the file name."""
    data = path.read_bytes()
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise ValueError(
            f"{str(path)!r} is not a readable gzip file ({exc}); it is truncated or "
            "corrupt. Re-install dataset-fashion-mnist or download the file again."
        ) from exc


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array with ``ndim`` dimensions, header checked."""
    data = _read_bytes(path)
    header_size = 4 + 4 * ndim
    expected_magic = (_IDX_UBYTE << 8) | ndim
    if len(data) < header_size:
        raise ValueError(
            f"{str(path)!r} is {len(data)} bytes, shorter than the {header_size}-byte "
            "IDX header; the file is truncated. Re-install dataset-fashion-mnist or "
            "download the file again."
        )
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{str(path)!r} has magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(unsigned bytes, {ndim} dimensions); it is not a Fashion-MNIST IDX file "
            "of this kind, or it is corrupt."
        )
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(data) - header_size != size:
        raise ValueError(
            f"{str(path)!r} declares shape {shape} ({size} bytes of data) but holds "
            f"{len(data) - header_size}; the file is truncated or corrupt. Re-install "
            "dataset-fashion-mnist or download the file again."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def load_fashion_mnist(data_home: str | os.PathLike | None = None, *,
                       subset: str = "train") -> Bunch:
    """Load Fashion-MNIST from its IDX files.

    Reads ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (or the
    ``t10k-`` pair), gzip-compressed (``.gz``) or raw, as published by Zalando,
    installed by Debian's ``dataset-fashion-mnist`` package or downloaded by
    ``torchvision.datasets.FashionMNIST``. Nothing is downloaded here: get the
    four ``.gz`` files from
    https://github.com/zalandoresearch/fashion-mnist/tree/master/data/fashion.

    The files are looked for, in this order, in

    1. ``<home>/fashion-mnist/`` (skt's layout),
    2. ``<home>/FashionMNIST/raw/`` (torchvision's, for ``root=<home>``),
    3. ``<home>/`` itself,
    4. only when ``data_home`` is None: ``/usr/share/datasets/fashion-mnist``
       (:data:`FASHION_MNIST_FOLDER`, where ``apt-get install
       dataset-fashion-mnist`` puts them),

    where ``<home>`` is ``data_home``, else the ``SKT_DATA`` environment
    variable, else ``~/skt_data``, like scikit-learn's ``data_home`` and
    ``SCIKIT_LEARN_DATA``. The first folder holding any of the four files is
    used.

    Parameters
    ----------
    data_home : str or path-like, default=None
        Data folder to look in; ``~`` is expanded. None means ``$SKT_DATA``
        or ``~/skt_data``, then Debian's folder.
    subset : {"train", "test"}, default="train"
        The official split: 60,000 training or 10,000 test images.

    Returns
    -------
    data : :class:`sklearn.utils.Bunch`
        images : ndarray of shape (n_samples, 28, 28) and dtype uint8
            Pixel values 0 (background) to 255.
        target : ndarray of shape (n_samples,) and dtype int64
            Class index, 0-9.
        target_names : ndarray of shape (10,) and dtype str
            ``"T-shirt/top"``, ``"Trouser"``, ... ``"Ankle boot"``, so
            ``target_names[target]`` gives the class names.
        DESCR : str
            Description, citation and licence (MIT).

    Raises
    ------
    FileNotFoundError
        If no searched folder holds the files (the message lists the folders
        and how to get the data), or the folder found lacks one of the two.
    ValueError
        If a file is bad gzip, or its magic number, declared size or labels
        do not match; the message names the file.

    Examples
    --------
    >>> from skt.datasets import load_fashion_mnist
    >>> test = load_fashion_mnist(subset="test")
    >>> test.images.shape, test.images.dtype
    ((10000, 28, 28), dtype('uint8'))
    >>> test.target_names[test.target[:3]].tolist()
    ['Ankle boot', 'Pullover', 'Trouser']
    """
    prefixes = {"train": "train", "test": "t10k"}
    if subset not in prefixes:
        raise ValueError(f"subset must be 'train' or 'test'; got {subset!r}.")
    folder = _find_fashion_folder(data_home)
    prefix = prefixes[subset]
    images_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(images_path, ndim=3)
    target = _read_idx(labels_path, ndim=1).astype(np.int64)
    if len(images) != len(target):
        raise ValueError(
            f"{str(images_path)!r} holds {len(images)} images but {str(labels_path)!r} "
            f"holds {len(target)} labels; the two files do not belong together."
        )
    if target.size and target.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(
            f"{str(labels_path)!r} has label {target.max()}; Fashion-MNIST labels are 0-9."
        )
    return Bunch(
        images=images.copy(),  # frombuffer views are read-only
        target=target,
        target_names=np.array(FASHION_MNIST_CLASSES),
        DESCR=_FASHION_DESCR,
    )


# ------------------------------------------------------------------- digits --

def load_digits_images(size: int = 64) -> Bunch:
    """Load scikit-learn's 8x8 digits as ``uint8`` images of ``size`` x ``size``.

    Values 0-16 are scaled to 0-255 and the images upsampled bilinearly.
    Bilinear strokes suit ImageNet backbones far better than blocks of
    repeated pixels: 5-fold logistic regression on EfficientNet-Lite0
    penultimate features at 64 px scored 0.926 from bilinear digits and 0.82
    from nearest-neighbour ones.

    Parameters
    ----------
    size : int, default=64
        Side of the output images, at least 8.

    Returns
    -------
    data : :class:`sklearn.utils.Bunch`
        images : ndarray of shape (1797, size, size) and dtype uint8
            The digits, 0 (background) to 255.
        target : ndarray of shape (1797,) and dtype int64
            The digit, 0-9.
        target_names : ndarray of shape (10,)
            ``0`` to ``9``.
        DESCR : str
            Description and source.

    Examples
    --------
    >>> from skt.datasets import load_digits_images
    >>> digits = load_digits_images(size=32)
    >>> digits.images.shape, digits.images.dtype
    ((1797, 32, 32), dtype('uint8'))
    >>> int(digits.images.max())
    255
    """
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 8:
        raise ValueError(f"size must be an integer >= 8 (the digits are 8x8); got {size!r}.")
    digits = load_digits()
    grid = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    upsampled = torch.nn.functional.interpolate(grid, size=(size, size), mode="bilinear",
                                                align_corners=False)[:, 0]
    return Bunch(
        images=(upsampled.clamp(0, 1) * 255).round().to(torch.uint8).numpy(),
        target=digits.target.astype(np.int64),
        target_names=digits.target_names,
        DESCR=_DIGITS_DESCR,
    )


# ---------------------------------------------------------------- subsample --

_METADATA_FIELDS = ("DESCR", "target_names")


def subsample(bunch: Bunch, n: int | float, random_state: int | None = None) -> Bunch:
    """Stratified random subset of a data-set bunch.

    Every field as long as ``bunch.target`` (``images``, ``target``,
    ``probability``, ...) is cut to the same rows; ``DESCR``,
    ``target_names`` and other fields are kept as they are. Class
    proportions are preserved as closely as ``n`` allows, through
    :func:`sklearn.model_selection.train_test_split` with ``stratify``.

    Parameters
    ----------
    bunch : :class:`sklearn.utils.Bunch`
        A bunch with a ``target`` field, e.g. from :func:`load_elpv`.
    n : int or float
        Number of samples to keep (at least the number of classes), or a
        fraction in (0, 1].
    random_state : int, RandomState instance or None, default=None
        Seed for the draw; pass an int for the same subset every time.

    Returns
    -------
    subset : :class:`sklearn.utils.Bunch`
        A new bunch; kept rows stay in their original order.

    Examples
    --------
    >>> import numpy as np
    >>> from skt.datasets import load_digits_images, subsample
    >>> small = subsample(load_digits_images(), 100, random_state=0)
    >>> small.images.shape, np.bincount(small.target).tolist()
    ((100, 64, 64), [10, 10, 10, 10, 10, 10, 10, 10, 10, 10])
    """
    if "target" not in bunch:
        raise ValueError("bunch has no 'target' field to stratify on.")
    target = np.asarray(bunch.target)
    n_samples = len(target)
    if (n == 1.0 and isinstance(n, float)) or n == n_samples:
        keep = np.arange(n_samples)
    else:
        if isinstance(n, int | np.integer) and n > n_samples:
            raise ValueError(f"n={n} is more than the {n_samples} samples in bunch.")
        keep, _ = train_test_split(np.arange(n_samples), train_size=n, stratify=target,
                                   random_state=random_state)
        keep = np.sort(keep)
    return Bunch(**{key: value if key in _METADATA_FIELDS else _take(value, keep, n_samples)
                    for key, value in bunch.items()})


def _take(value: Any, keep: np.ndarray, n_samples: int) -> Any:
    if isinstance(value, str) or not hasattr(value, "__len__") or len(value) != n_samples:
        return value
    if isinstance(value, list):
        return [value[i] for i in keep]
    return np.asarray(value)[keep]
