"""Generated bad inputs, and what each entry point makes of them.

Image items of every kind skt accepts, and of many it does not, drawn by
`hypothesis <https://hypothesis.readthedocs.io>`_ strategies: arrays and
tensors of any dtype, shape and values (NaN, infinities, out of range);
PIL images of every mode, of any size, closed or lazily opened on a
truncated file; files of every format, damaged or not (truncated, empty,
garbage, a decompression bomb), under any name the filesystem allows
(newlines, undecodable bytes), missing, or folders; and whole ``X`` values
that are not image collections at all.

:func:`classify` runs one case through one entry point and sorts the
outcome:

``"clean"``
    Either the features (or predictions) of the item inside a batch equal
    those of the item alone, and its neighbours' equal theirs; or a
    ``ValueError``/``TypeError`` naming the item: its path where it has one,
    else ``Image 1`` (or ``X``, for a whole ``X``).
``"raw"``
    Any other exception, or an error that does not say which item.
``"silent"``
    A result that differs from the item alone, rows belonging to another
    item, NaN features, or an item accepted in a batch but refused alone.

``tests/test_robustness.py`` asserts that every drawn case is clean;
``benchmarks/bench_faults.py`` draws a thousand and prints the counts.
Needs ``hypothesis`` (in the ``bench`` and ``test`` extras).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st
from PIL import Image

__all__ = ["OUTCOMES", "Case", "bad_inputs", "classify", "classify_skipping", "command_entry",
           "file_cases", "pil_cases", "whole_x_cases"]

OUTCOMES = ("clean", "raw", "silent")

_NAMES_ITEM = re.compile(r"\bImage 1\b")
_NAMES_ANY = re.compile(r"(\bImage \d+\b|\bX\b|\by\b)")


@dataclass(frozen=True)
class Case:
    """One generated input: ``make(folder)`` builds it (files go into ``folder``).

    ``whole`` cases are a whole ``X``; the others are one item, which
    :func:`classify` puts between two good images.
    """

    label: str
    make: Callable[[Path], Any]
    whole: bool = False
    path: bool = False

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return f"Case({self.label})"


# ---------------------------------------------------------------- pixels --

ARRAY_DTYPES = ("uint8", "uint16", "int8", "int16", "int32", "int64", "float16", "float32",
                "float64", "bool", "complex64", "object")
TENSOR_DTYPES = ("uint8", "uint16", "int8", "int32", "int64", "float16", "bfloat16",
                 "float32", "float64", "bool", "complex64")
FILLS = ("random", "zeros", "ones", "nan", "inf", "negative", "over")


def _pixels(shape: tuple[int, ...], dtype: str, fill: str, seed: int) -> np.ndarray:
    """Numpy pixels of ``shape`` (``dtype`` a numpy name; bfloat16 is made by the caller)."""
    rng = np.random.default_rng(seed)
    kind = np.dtype(dtype if dtype != "bfloat16" else "float32")
    base = rng.random(shape)
    if fill == "zeros":
        base = np.zeros(shape)
    elif fill == "ones":
        base = np.ones(shape)
    if kind.kind in "iu":
        top = 255 if kind.itemsize == 1 else 65535
        values = np.rint(base * top)
        if fill == "negative" and kind.kind == "i":
            values = -values - 1
        elif fill == "over":
            values = values + (np.iinfo(kind).max // 2)
        return values.astype(kind)
    if kind.kind == "b":
        return base > 0.5
    if kind.kind == "O":
        return np.rint(base * 255).astype(np.int64).astype(object)
    values = base.astype(np.float64)
    if fill in ("nan", "inf") and values.size:
        values.flat[rng.integers(values.size)] = np.nan if fill == "nan" else np.inf
    elif fill == "negative":
        values = -values - 0.5
    elif fill == "over":
        values = values + 1.5
    return values.astype(kind)


def _as_tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(torch.bfloat16)
    if dtype == "uint16":
        return torch.from_numpy(array.astype(np.int32)).to(torch.uint16)
    return torch.from_numpy(np.ascontiguousarray(array))


_SIDES = st.integers(0, 9)


def _shapes(channels_first: bool, batch: bool) -> st.SearchStrategy[tuple[int, ...]]:
    image = st.one_of(
        st.tuples(_SIDES, _SIDES),
        st.tuples(st.integers(0, 5), _SIDES, _SIDES) if channels_first
        else st.tuples(_SIDES, _SIDES, st.integers(0, 5)),
        st.lists(st.integers(0, 4), max_size=5).map(tuple),
    )
    if not batch:
        return image
    return st.tuples(st.integers(0, 3), image).map(lambda t: (t[0], *t[1]))


@st.composite
def array_cases(draw, *, tensor: bool = False, whole: bool = False) -> Case:
    """A numpy array (or torch tensor) of any dtype, shape and values."""
    dtype = draw(st.sampled_from(TENSOR_DTYPES if tensor else ARRAY_DTYPES))
    shape = draw(_shapes(channels_first=tensor, batch=whole))
    fill = draw(st.sampled_from(FILLS))
    seed = draw(st.integers(0, 2**16))
    what = "tensor" if tensor else "array"

    def make(folder: Path):
        array = _pixels(shape, dtype, fill, seed)
        return _as_tensor(array, dtype) if tensor else array

    return Case(f"{dtype} {what} {shape} {fill}" + (" as X" if whole else ""), make,
                whole=whole)


PIL_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
             "LAB", "HSV", "I", "I;16", "I;16B", "F")


def _pil(mode: str, size: tuple[int, int], fill: str, seed: int) -> Image.Image:
    width, height = size
    if mode in ("F", "I"):
        dtype = "float32" if mode == "F" else "int32"
        return Image.fromarray(_pixels((height, width), dtype, fill, seed))
    rgb = Image.fromarray(_pixels((height, width, 3), "uint8", "random", seed))
    try:
        return rgb.convert(mode)
    except ValueError:  # modes PIL cannot convert to
        return Image.new(mode, size)


@st.composite
def pil_cases(draw) -> Case:
    """A PIL image of any mode and size, with any values, possibly closed."""
    mode = draw(st.sampled_from(PIL_MODES))
    size = draw(st.tuples(_SIDES, _SIDES))
    fill = draw(st.sampled_from(FILLS))
    seed = draw(st.integers(0, 2**16))
    closed = draw(st.booleans()) if mode in ("RGB", "L") else False

    def make(folder: Path):
        image = _pil(mode, size, fill, seed)
        if closed:
            image.close()
        return image

    return Case(f"PIL {mode} {size} {fill}{' closed' if closed else ''}", make)


# ----------------------------------------------------------------- files --

FORMATS = ("png", "jpeg", "bmp", "gif", "tiff", "webp", "float-tiff", "png16")
DAMAGE = ("none", "none", "truncated", "empty", "garbage", "text", "bomb")
PLACES = ("file", "file", "file", "missing", "folder")
GIVEN = ("str", "path", "pil")

# Any character a POSIX file name may hold, and bytes that are not UTF-8.
_NAME_TEXT = st.text(st.characters(exclude_characters="/\x00", codec="utf-8"),
                     min_size=1, max_size=12).filter(lambda name: name not in (".", ".."))
_NAME_BYTES = st.binary(min_size=1, max_size=8).filter(
    lambda b: b"/" not in b and b"\x00" not in b and b not in (b".", b".."))


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "float-tiff":
        image.convert("L").point(lambda v: v / 255.0, mode="F").save(buffer, "TIFF")
    elif fmt == "png16":
        gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray).save(buffer, "PNG")
    else:
        saved = image.convert("P") if fmt == "gif" else image
        saved.save(buffer, fmt.upper())
    return buffer.getvalue()


def _bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` pixels, then a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = b"IDAT" + zlib.compress(b"\x00" * 16)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + struct.pack(">I", 16) + data[:20]
            + struct.pack(">I", zlib.crc32(data[:20])))


def _damaged(good: bytes, damage: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if damage == "truncated":
        return good[:max(1, len(good) // 2)]
    if damage == "empty":
        return b""
    if damage == "garbage":
        return rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    if damage == "text":
        return b"not an image\n"
    if damage == "bomb":
        return _bomb()
    return good


@st.composite
def file_cases(draw) -> Case:
    """An image file of any format, damaged or not, under any name; or no file at all."""
    fmt = draw(st.sampled_from(FORMATS))
    damage = draw(st.sampled_from(DAMAGE))
    place = draw(st.sampled_from(PLACES))
    given = draw(st.sampled_from(GIVEN)) if place == "file" else draw(st.sampled_from(GIVEN[:2]))
    name = draw(st.one_of(_NAME_TEXT.map(os.fsencode), _NAME_BYTES))
    name = name[:200]
    size = draw(st.tuples(st.integers(1, 9), st.integers(1, 9)))
    seed = draw(st.integers(0, 2**16))

    def make(folder: Path):
        path = Path(os.fsdecode(os.path.join(os.fsencode(folder), name)))
        if place == "folder":
            path.mkdir()
        elif place == "file":
            good = _encode(_pil("RGB", size, "random", seed), fmt)
            path.write_bytes(_damaged(good, damage, seed))
        if given == "pil":
            try:
                return Image.open(path)  # lazily: decoded only when read
            except Exception:  # not openable at all: give the path instead
                return str(path)
        return path if given == "path" else str(path)

    label = f"{place} {fmt} {damage} named {name!r} given as {given}"
    return Case(label, make, path=given != "pil")


# --------------------------------------------------------------- whole X --

@st.composite
def whole_x_cases(draw) -> Case:
    """Values of ``X`` that are not a list of images, or odd containers of good ones."""
    kind = draw(st.sampled_from(("none", "int", "str", "dict", "set", "generator", "empty",
                                 "nested", "tuple", "object-array", "bytes", "array",
                                 "tensor")))
    if kind == "array":
        return draw(array_cases(whole=True))
    if kind == "tensor":
        return draw(array_cases(tensor=True, whole=True))
    good = _good_items()

    def make(folder: Path):
        return {
            "none": lambda: None,
            "int": lambda: 3,
            "str": lambda: "not a list",
            "dict": lambda: dict(enumerate(good)),
            "set": lambda: {1, 2},
            "generator": lambda: (item for item in good),
            "empty": lambda: [],
            "nested": lambda: [[1, 2], [3, 4]],
            "tuple": lambda: tuple(good),
            "object-array": lambda: np.array([*good, None], dtype=object)[:-1],
            "bytes": lambda: b"\x89PNG",
        }[kind]()

    return Case(f"X = {kind}", make, whole=True)


def bad_inputs() -> st.SearchStrategy[Case]:
    """Every kind of case above, in one strategy."""
    return st.one_of(array_cases(), array_cases(tensor=True), pil_cases(), file_cases(),
                     whole_x_cases())


# ------------------------------------------------------------- classify --

def command_entry(main: Callable[[list[str]], int], folder: Path,
                  options: tuple[str, ...] = ()) -> Callable[[list], np.ndarray]:
    """``skt extract`` as an entry point: ``main`` is :func:`skt.cli.main`, run in this process.

    Items that are not paths are first saved as PNG files in ``folder``. A
    failed run raises ``ValueError`` with its one error line, which must
    then be the only line on stderr besides progress.
    """
    counter = iter(range(10**9))

    def entry(X: list) -> np.ndarray:
        paths = []
        for item in X:
            if isinstance(item, np.ndarray):
                path = folder / f"given-{next(counter)}.png"
                Image.fromarray(item).save(path)
                item = path
            paths.append(os.fspath(item))
        output = folder / f"features-{next(counter)}.npy"
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            status = main(["extract", *paths, "-o", str(output), *options])
        if status != 0:
            lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
            raise ValueError(lines[-1].removeprefix("skt: error: ") if lines else
                             f"exit status {status} without a message")
        return np.load(output)

    return entry


def _good_items() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (12, 10, 3), dtype=np.uint8),
            rng.integers(0, 256, (9, 14), dtype=np.uint8)]


def _mentions(message: str, case: Case, item: Any) -> bool:
    if case.whole:
        return bool(_NAMES_ANY.search(message))
    if case.path:  # the file's name is the item's name (``skt extract`` has no index)
        path = os.fspath(item)
        return path in message or repr(path)[1:-1] in message
    return bool(_NAMES_ITEM.search(message))


def classify(entry: Callable[[Any], Any], case: Case, folder: Path, *,
             compare: bool = True) -> tuple[str, str]:
    """Run ``case`` through ``entry`` and return ``(outcome, detail)``.

    ``entry(X)`` is an entry point that returns one row per image (features,
    probabilities) or raises. A single item is passed as the middle one of
    three; the outcome compares its row with ``entry([item])`` and the
    neighbours' with theirs. ``compare=False`` is for entry points with no
    rows to compare, such as ``fit``: success is clean.
    """
    folder.mkdir(parents=True, exist_ok=True)
    good = _good_items()
    item = case.make(folder)
    X = item if case.whole else [good[0], item, good[1]]
    try:
        result = entry(X)
        rows = np.asarray(result) if compare else None
    except (ValueError, TypeError) as exc:
        message = str(exc)
        if _mentions(message, case, item):
            return "clean", f"{type(exc).__name__}: {message}"
        return "raw", f"{type(exc).__name__} without the item: {message}"
    except Exception as exc:  # exactly what is being counted
        return "raw", f"{type(exc).__name__}: {exc}"
    if not compare:
        return "clean", "accepted"
    if not np.all(np.isfinite(rows)):
        return "silent", "non-finite values in the result"
    if case.whole:
        alone = [np.asarray(entry([x])) for x in (item if isinstance(item, list | tuple)
                                                   else list(item))]
        expected = np.concatenate(alone) if alone else rows[:0]
    else:
        (folder / "alone").mkdir(exist_ok=True)
        try:
            expected = np.concatenate([np.asarray(entry([good[0]])),
                                       np.asarray(entry([case.make(folder / "alone")]
                                                        if case.path else [item])),
                                       np.asarray(entry([good[1]]))])
        except Exception as exc:  # what refuses the item alone
            return "silent", f"accepted in a batch, refused alone: {type(exc).__name__}: {exc}"
    if rows.shape != expected.shape or not np.allclose(rows, expected, rtol=1e-4, atol=1e-5):
        return "silent", "rows differ from the items processed alone"
    return "clean", "same result as the items alone"


def classify_skipping(extractor: Any, case: Case, folder: Path) -> tuple[str, str]:
    """:func:`classify` for a fitted ``FeatureExtractor(on_error="skip")``.

    A single item is either used (its row equals its features alone) or
    skipped: its row NaN, ``skipped_`` naming it as index 1 with a message
    naming it, the neighbours' rows their own. A whole ``X`` raises an error
    naming it, or gives NaN rows exactly where ``skipped_`` says and, in the
    others, each item's features alone.
    """
    from sklearn.base import clone

    strict = clone(extractor).set_params(on_error="raise").fit([_good_items()[0]])
    folder.mkdir(parents=True, exist_ok=True)
    good = _good_items()
    item = case.make(folder)
    if case.whole:
        return _whole_skipping(extractor, strict, case, item)
    try:
        rows = extractor.transform([good[0], item, good[1]])
    except Exception as exc:  # a single item never stops a skipping run
        return "raw", f"{type(exc).__name__} despite on_error='skip': {exc}"
    skipped = dict(extractor.skipped_)
    neighbours = strict.transform([good[0], good[1]])
    if not np.allclose(rows[[0, 2]], neighbours, rtol=1e-4, atol=1e-5):
        return "silent", "the neighbours' rows differ from their own features"
    if 1 in skipped:
        if set(skipped) != {1} or not np.all(np.isnan(rows[1])):
            return "silent", f"skipped_ {sorted(skipped)} or a row that is not NaN"
        if not _mentions(skipped[1], case, item):
            return "raw", f"a skip message without the item: {skipped[1]}"
        return "clean", f"skipped: {skipped[1]}"
    if skipped or not np.all(np.isfinite(rows[1])):
        return "silent", f"skipped_ {sorted(skipped)}, or NaN in a row used"
    (folder / "alone").mkdir(exist_ok=True)
    alone = strict.transform([case.make(folder / "alone") if case.path else item])
    if not np.allclose(rows[1], alone[0], rtol=1e-4, atol=1e-5):
        return "silent", "the item's row differs from its features alone"
    return "clean", "used, with its own features"


def _whole_skipping(extractor: Any, strict: Any, case: Case, X: Any) -> tuple[str, str]:
    try:
        rows = extractor.transform(X)
    except (ValueError, TypeError) as exc:
        if _mentions(str(exc), case, X):
            return "clean", f"{type(exc).__name__}: {exc}"
        return "raw", f"{type(exc).__name__} without the item: {exc}"
    except Exception as exc:  # exactly what is being counted
        return "raw", f"{type(exc).__name__}: {exc}"
    skipped = dict(extractor.skipped_)
    nan_rows = set(np.flatnonzero(np.isnan(rows).any(axis=1)).tolist())
    if nan_rows != set(skipped) or not np.all(np.isnan(rows[sorted(skipped)])):
        return "silent", f"NaN rows {sorted(nan_rows)} but skipped_ {sorted(skipped)}"
    items = list(X)
    for index, row in enumerate(rows):
        if index not in skipped and not np.allclose(
                row, strict.transform([items[index]])[0], rtol=1e-4, atol=1e-5):
            return "silent", f"row {index} differs from its item's features alone"
    return "clean", f"{len(skipped)} skipped, the other rows their items' own"
