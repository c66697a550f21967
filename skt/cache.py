"""A content-addressed, process-safe store of per-image layer summaries.

Three parts: content fingerprints of images (:func:`fingerprint`) and of
networks (:func:`fingerprint_module`); the store (:class:`FeatureCache`);
and its lookup/fill protocol (:meth:`FeatureCache.serve`): read what is
there, compute the rest under a lock, write it back.

Layout under the cache directory::

    skt-features/v<FORMAT>/<config>/config.json          what <config> describes
    skt-features/v<FORMAT>/<config>/<layer>/<ab>/<image>  one entry per image
    skt-features/v<FORMAT>/<config>/graph-<layout>.onnx   an exported ONNX graph
        .../graph-<layout>.layers.json                    the layers that graph computes
        .../graph-<layout>-engine-<machine>.json          engine="auto"'s measured choice

``<config>`` hashes everything that changes a layer's output except the image:
the backbone, a hash of its actual weights, every preprocessing setting and
the compute dtype. ``<layer>`` hashes the layer name and the summary kind
(pooling statistics, or the whole map for ``pooling="flatten"``). ``<image>``
hashes the image content (see :func:`fingerprint`). Any change in
these misses, so nothing stale is returned.

Entries read or written by this process also stay in memory, up to
``MEMORY_BUDGET`` bytes, least recently used first out.

Each entry (an ``.npy`` payload) and each graph is followed by a 16-byte
BLAKE2b checksum of its place in the cache (its path below ``skt-features``)
and its payload. It is written to a temporary file and renamed into place, so
concurrent writers and processes killed mid-write never leave a partial file
under a real name. A file that fails its checksum -- truncated, corrupt, or
moved from another entry's place -- is discarded with a warning naming it, and
recomputed.

Features are derived data: a broken cache costs time, never correctness.
Trouble therefore degrades to working without the cache, with one warning
naming the file or folder, except where the user can fix it before any work
is done:

- A damaged entry or graph is discarded with a warning, recomputed and
  rewritten. A ``config.json`` that is unreadable or describes another
  configuration is rewritten on the configuration's next use;
  :func:`cache_info` reports it as ``{"error": ...}``, with a warning.
- An explicit ``cache=`` folder that cannot be written when ``fit`` starts is
  an error naming the folder (:func:`check_cache_writable`): better than
  hours of computing whose results are not kept.
- A write that fails later (a full disk, a folder remounted read-only) warns
  once per folder and process; entries already there are still read, new
  ones are computed and kept in memory only. :func:`clear_cache` on the
  folder lets this process write there again.
- skt's own folder (:func:`default_cache_dir`) not writable: one warning,
  and exported graphs stay in memory.
- A ``.lock`` that cannot be created or taken: work goes on unlocked. Entries
  stay correct; parallel processes may compute the same images twice.
- :func:`cache_info` and :func:`clear_cache` on a folder that does not exist
  raise ``FileNotFoundError``.

Every path, ``$SKT_CACHE_DIR`` and ``$XDG_CACHE_HOME`` included, may start
with ``~``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from skt._utils import LRU, atomic_write, expand_path

__all__ = ["DEFAULT_CACHE_MAX_BYTES", "FORMAT_VERSION", "MEMORY_BUDGET", "FeatureCache",
           "bound_default_cache", "cache_info", "check_cache_writable", "clear_cache",
           "default_cache_dir", "default_cache_max_bytes", "fingerprint", "fingerprint_module",
           "forget_memory", "mark_used", "open_cache", "seal", "unseal", "write_cache_file"]

FORMAT_VERSION = 3
"""Part of every configuration's key: a new version (3: GeM summaries hold the root, token
summaries the class token) leaves older entries unread rather than misread."""
MEMORY_BUDGET = 256 * 2**20
"""Bytes of entries this process keeps in memory, least recently used first out.

Entries are content-addressed and never change once written, so a copy in
memory cannot go stale; it saves the file read and checksum on each of the
dozens of fits of a grid search."""
_ROOT = "skt-features"
_CHECKSUM = 16
_MEMORY = LRU(max_bytes=MEMORY_BUDGET, size_of=lambda array: array.nbytes)
# A file whose path, inode, size and nanosecond modification time are unchanged
# keeps its hash within a process: GridSearchCV asks for it dozens of times.
_FILE_HASHES = LRU(max_items=1_000_000)
# Cache folders a write failed in: this process warned once and writes there no more.
_UNWRITABLE: set[str] = set()


# ----------------------------------------------------------- fingerprints --

def _file_fingerprint(path: str | os.PathLike) -> str:
    stat = os.stat(path)
    identity = (os.fspath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def digest_file() -> str:
        digest = hashlib.blake2b(b"file", digest_size=16)
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    return _FILE_HASHES.get_or_make(identity, digest_file)


def _is_tensor(item: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported
    return torch is not None and torch.is_tensor(item)


def fingerprint(item: Any) -> str:
    """Content hash of one image: file bytes for paths, pixels otherwise.

    Paths are keyed by content rather than by name and modification time, so a
    file rewritten in place never returns stale features, and copies or moved
    files still hit. A process remembers the hash of a file until its inode,
    size or modification time changes.

    Examples
    --------
    >>> import numpy as np
    >>> from skt.cache import fingerprint
    >>> a = np.zeros((4, 4), dtype=np.uint8)
    >>> fingerprint(a) == fingerprint(a.copy()), fingerprint(a) == fingerprint(a + 1)
    (True, False)
    """
    if isinstance(item, str | os.PathLike):
        return _file_fingerprint(item)
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(item, Image.Image):
        digest.update(f"pil|{item.mode}|{item.size}".encode())
        digest.update(item.tobytes())
        if item.mode in ("P", "PA"):  # the pixels are indices: the colours are in the palette
            digest.update(bytes(item.getpalette() or ()))
    else:
        tensor = _is_tensor(item)
        array = np.ascontiguousarray(item.detach().cpu().numpy() if tensor else item)
        digest.update(f"array|{'chw' if tensor else 'hwc'}|{array.dtype}|{array.shape}".encode())
        digest.update(array.data)
    return digest.hexdigest()


def fingerprint_module(module: Any) -> str:
    """Content hash of a torch module's parameters and buffers (names, dtypes, values)."""
    import torch

    digest = hashlib.blake2b(digest_size=16)
    digest.update(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------- sealing --

def _place(path: Path) -> str:
    """A file's place in its cache: its path below the last ``skt-features`` folder.

    Independent of where the cache folder itself lives, so a cache moved or
    copied as a whole stays valid.
    """
    parts = Path(path).parts
    below = [i for i, part in enumerate(parts) if part == _ROOT]
    return "/".join(parts[below[-1] + 1:] if below else parts[-1:])


def _checksum(place: str, payload: bytes) -> bytes:
    digest = hashlib.blake2b(digest_size=_CHECKSUM)
    digest.update(place.encode() + b"\0")
    digest.update(payload)
    return digest.digest()


def seal(path: str | os.PathLike, payload: bytes) -> bytes:
    """``payload`` followed by the checksum of it and of its place ``path`` in the cache."""
    return payload + _checksum(_place(Path(path)), payload)


def unseal(path: str | os.PathLike, data: bytes) -> bytes | None:
    """The payload of :func:`seal`'s ``data`` read from ``path``; None when it fails the check.

    A truncated or corrupt file fails, and so does a valid file moved or
    copied to another file's place.

    Examples
    --------
    >>> from skt.cache import seal, unseal
    >>> data = seal("skt-features/v2/a/entry", b"payload")
    >>> unseal("skt-features/v2/a/entry", data), unseal("skt-features/v2/b/entry", data)
    (b'payload', None)
    >>> unseal("skt-features/v2/a/entry", data[:-1]) is None
    True
    """
    payload, checksum = data[:-_CHECKSUM], data[-_CHECKSUM:]
    if len(data) > _CHECKSUM and _checksum(_place(Path(path)), payload) == checksum:
        return payload
    return None


# ---------------------------------------------------------------- folders --

def _location(cache: Any) -> Path | None:
    if cache is None:
        return None
    location = getattr(cache, "location", cache)  # a joblib.Memory
    return None if location is None else expand_path(location)


def _location_of(path: Path) -> Path:
    """The cache folder holding ``path``: the parent of its last ``skt-features`` folder."""
    for parent in path.parents:
        if parent.name == _ROOT:
            return parent.parent
    return path.parent


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _writes_stopped(location: Path) -> bool:
    return os.path.abspath(location) in _UNWRITABLE


def _stop_writing(location: Path, message: str) -> None:
    """Warn once per folder and process, and write there no more."""
    key = os.path.abspath(location)
    if key not in _UNWRITABLE:
        _UNWRITABLE.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def write_cache_file(path: str | os.PathLike, data: bytes) -> bool:
    """Write a file of a cache folder atomically; False when the folder cannot be written.

    The first failure (a full disk, a read-only folder) warns, naming the
    folder; this process then stops writing there, so a long run goes on
    without the cache instead of failing or warning on every entry.
    """
    path = Path(path)
    location = _location_of(path)
    if _writes_stopped(location):
        return False
    try:
        atomic_write(path, data)
    except OSError as exc:
        _stop_writing(location, f"Cannot write to the cache folder {location} ({_reason(exc)}); "
                                "carrying on without storing features or graphs there in this "
                                "process. Free disk space or fix the folder's permissions to "
                                "cache again.")
        return False
    return True


def _default_folder() -> Path:
    if os.environ.get("SKT_CACHE_DIR"):
        return expand_path(os.environ["SKT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return expand_path(base) / "skt"


def _try_writing(folder: Path) -> None:
    """Create ``folder`` if needed and a file in it; raise OSError when that fails.

    Trying beats ``os.access``, which answers yes to root in a folder of any
    permissions and knows nothing of quotas.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass


def default_cache_dir() -> Path | None:
    """skt's own folder for exported ONNX graphs when no ``cache=`` is given.

    ``$SKT_CACHE_DIR``, else ``$XDG_CACHE_HOME/skt``, else ``~/.cache/skt``
    (``~`` expanded). None when it cannot be created or written, after one
    warning naming the folder: graphs then stay in memory.
    """
    folder = _default_folder()
    if _writes_stopped(folder):
        return None  # warned already
    try:
        _try_writing(folder)
    except OSError as exc:
        _stop_writing(folder, f"skt's cache folder {folder} is not writable ({_reason(exc)}); "
                              "carrying on without it: exported ONNX graphs stay in memory, and "
                              "fine-tuning's temporary files go to the system's temporary "
                              "folder. Set SKT_CACHE_DIR to a writable folder to keep them.")
        return None
    return folder


def check_cache_writable(cache: Any) -> None:
    """Fail early when the folder of a ``cache=`` parameter cannot be written.

    Called by ``fit``: a folder the user asked for that is read-only is
    better reported before hours of computing than found out entry by entry.
    Creates the folder when it is missing.

    Parameters
    ----------
    cache : str, path, joblib.Memory or None
        As given to ``cache=``; None passes.

    Raises
    ------
    OSError
        ``PermissionError`` and the like, naming the folder and what to do.

    Examples
    --------
    >>> import tempfile
    >>> from skt.cache import check_cache_writable
    >>> check_cache_writable(tempfile.mkdtemp())  # passes in silence
    """
    location = _location(cache)
    if location is None:
        return
    try:
        _try_writing(location / _ROOT / f"v{FORMAT_VERSION}")
    except OSError as exc:
        raise type(exc)(f"cache={str(location)!r} cannot be written ({_reason(exc)}). Fix the "
                        "folder's permissions, choose another folder, or pass cache=None to "
                        "extract without a cache.") from exc


def open_cache(cache: Any) -> FeatureCache | None:
    """The cache for a ``cache=`` parameter: None, a directory or a ``joblib.Memory``."""
    location = _location(cache)
    return None if location is None else FeatureCache(location)


# ------------------------------------------------------------------ store --

def _hash(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _as_json(description: dict[str, Any]) -> str:
    return json.dumps(description, indent=1, default=str)


def _read_description(path: Path) -> dict[str, Any]:
    """The configuration ``path`` (a ``config.json``) describes.

    Raises OSError or ValueError when it cannot be read or is not a JSON object.
    """
    description = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(description, dict):
        raise ValueError(f"a JSON {type(description).__name__}, not an object")
    return description


Compute = Callable[[list[int]], Iterable[tuple[Sequence[int], Sequence[np.ndarray]]]]
Emit = Callable[[Sequence[int], Sequence[np.ndarray]], None]


class FeatureCache:
    """Entries of one cache directory, with the most recent ones also in memory.

    Parameters
    ----------
    location : path
        Directory holding the cache (``~`` expanded); created on first write.

    Attributes
    ----------
    location : Path
        The directory.
    root : Path
        Where this format version's configurations are:
        ``location/skt-features/v<FORMAT_VERSION>``.
    """

    def __init__(self, location: str | os.PathLike) -> None:
        self.location = expand_path(location)
        self.root = self.location / _ROOT / f"v{FORMAT_VERSION}"

    def config_key(self, description: dict[str, Any]) -> str:
        """Key of a configuration; records its description in ``<key>/config.json``.

        The record is derived data: one that is missing, unreadable or
        describing something else is (re)written, the last two with a warning.
        """
        key = _hash(description)
        path = self.root / key / "config.json"
        text = _as_json(description)
        try:
            recorded = _read_description(path)
        except FileNotFoundError:
            recorded = None
        except (OSError, ValueError):
            recorded = {}
        if recorded != json.loads(text):
            if recorded is not None and not _writes_stopped(self.location):
                warnings.warn(f"Rewriting {path}: it was unreadable or described another "
                              "configuration.", RuntimeWarning, stacklevel=2)
            write_cache_file(path, text.encode())
        return key

    def layer_folder(self, config: str, layer: str, kind: str) -> Path:
        """Folder of one layer's entries; an image's entry is ``<folder>/<ab>/<image>``."""
        return self.root / config / _hash(layer, kind)

    def load(self, path: Path) -> np.ndarray | None:
        """The entry at ``path``, or None when it is missing or damaged."""
        remembered = _MEMORY.get(str(path))
        if remembered is not None:
            return remembered
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        payload = unseal(path, data)
        if payload is not None:
            try:
                array = np.load(io.BytesIO(payload), allow_pickle=False)
            except ValueError:
                pass
            else:
                _remember(path, array)
                return array
        warnings.warn(f"Discarding damaged feature-cache entry {path} (truncated, corrupt or "
                      "moved from another entry's place); it will be recomputed.",
                      RuntimeWarning, stacklevel=2)
        with contextlib.suppress(OSError):
            path.unlink()
        return None

    def save(self, path: Path, array: np.ndarray) -> None:
        """Keep ``array`` as the entry at ``path``: in memory, and on disk while it can."""
        _remember(path, array)
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        write_cache_file(path, seal(path, buffer.getvalue()))

    @contextlib.contextmanager
    def lock(self, config: str) -> Iterator[None]:
        """Hold an exclusive lock on one configuration (POSIX; no-op elsewhere).

        Parallel workers computing the same images wait for each other instead
        of running the backbone twice. Where the lock file cannot be created or
        locked (a read-only folder), work goes on without it.
        """
        descriptor = _take_lock(self.root / config / ".lock")
        try:
            yield
        finally:
            if descriptor is not None:
                os.close(descriptor)  # releases the lock

    def serve(self, description: dict[str, Any], layers: Sequence[tuple[str, str]],
              keys: Sequence[str], compute: Compute, emit: Emit) -> None:
        """Hand every item's per-layer summaries to ``emit``, computing only what is missing.

        Parameters
        ----------
        description : dict
            What the configuration is (see :meth:`config_key`).
        layers : sequence of (name, kind)
            The layers, in the order of ``compute``'s and ``emit``'s lists.
        keys : sequence of str
            :func:`fingerprint` of each item.
        compute : callable
            ``compute(indices)`` yields ``(rows, summaries)``: item indices and,
            per layer, an array with one row per index.
        emit : callable
            ``emit(rows, summaries)``, the same shape, called for cached hits
            (stacked, one call) and for every computed batch.

        Missing items are computed under the configuration's lock, after a
        second look: another process may have filled them meanwhile.
        """
        config = self.config_key(description)
        folders = [self.layer_folder(config, name, kind) for name, kind in layers]
        paths = [[folder / key[:2] / key for folder in folders] for key in keys]

        def read(indices: Iterable[int]) -> list[int]:
            missing, hits, found = [], [], []
            for i in indices:
                entries = [self.load(path) for path in paths[i]]
                if any(entry is None for entry in entries):
                    missing.append(i)
                else:
                    hits.append(i)
                    found.append(entries)
            if hits:  # one numpy call per layer, not per image
                emit(hits, [np.stack(layer) for layer in zip(*found, strict=True)])
            return missing

        missing = read(range(len(keys)))
        if not missing:
            return
        with self.lock(config):
            for rows, summaries in compute(read(missing)):
                for j, i in enumerate(rows):
                    for path, summary in zip(paths[i], summaries, strict=True):
                        self.save(path, summary[j])
                emit(rows, summaries)


def _take_lock(path: Path) -> int | None:
    """A descriptor of ``path`` holding an exclusive ``flock``, or None where none can be had."""
    try:
        import fcntl
    except ImportError:  # Windows: entries stay correct, work may repeat
        return None
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
    # Read-only where the file exists but cannot be opened for writing.
    for flags in (os.O_WRONLY | os.O_CREAT, os.O_RDONLY):
        try:
            descriptor = os.open(path, flags, 0o666)
        except OSError:
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:
            os.close(descriptor)
            return None
        return descriptor
    return None


def _remember(path: Path, array: np.ndarray) -> None:
    array = np.array(array, copy=True)
    array.flags.writeable = False
    _MEMORY.put(str(path), array)


def forget_memory() -> None:
    """Drop the in-memory copies of entries (files on disk are untouched)."""
    _MEMORY.clear()


def _entries(folder: Path) -> Iterator[os.DirEntry]:
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as scan:
            for entry in scan:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif not entry.name.startswith("."):
                    yield entry


def _existing_folder(location: str | os.PathLike) -> Path:
    folder = expand_path(location)
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "no such folder"
        raise FileNotFoundError(f"{str(folder)!r}: {what}. Pass the folder given as cache=.")
    return folder


def _describe(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        return _read_description(path)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        error = f"unreadable config.json at {path}: {exc}"
        warnings.warn(f"{error}; it is rewritten the next time this configuration is used.",
                      RuntimeWarning, stacklevel=3)
        return {"error": error}


def cache_info(location: str | os.PathLike) -> dict[str, Any]:
    """What a cache directory holds: totals and one row per configuration.

    Returns
    -------
    dict
        ``{"path", "entries", "graphs", "bytes", "configs": [{"key", "entries",
        "graphs", "bytes", "description"}, ...]}``: feature entries, exported ONNX
        graphs and bytes on disk (both kinds), configurations largest first.
        A ``config.json`` that cannot be read gives the description
        ``{"error": "unreadable config.json at <path>: <reason>"}``, with a warning.

    Raises
    ------
    FileNotFoundError
        When ``location`` is not a folder. A folder holding no skt cache
        has 0 entries.

    Examples
    --------
    >>> import tempfile
    >>> from skt import cache_info
    >>> cache_info(tempfile.mkdtemp())["entries"]
    0
    """
    location = _existing_folder(location)
    root = location / _ROOT / f"v{FORMAT_VERSION}"
    configs = []
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            files = [e for e in _entries(folder) if e.name != "config.json"]
            graphs = [e for e in files if e.name.endswith(".onnx")]
            notes = [e for e in files if e.name.startswith("graph-") and e.name.endswith(".json")]
            configs.append({"key": folder.name,
                            "entries": len(files) - len(graphs) - len(notes),
                            "graphs": len(graphs),
                            "bytes": sum(e.stat().st_size for e in files),
                            "description": _describe(folder)})
    configs.sort(key=lambda c: c["bytes"], reverse=True)
    return {"path": str(location), "entries": sum(c["entries"] for c in configs),
            "graphs": sum(c["graphs"] for c in configs),
            "bytes": sum(c["bytes"] for c in configs), "configs": configs}


def clear_cache(location: str | os.PathLike, max_bytes: int | None = None) -> int:
    """Delete cached features; return the number of bytes freed.

    With ``max_bytes``, delete the oldest entries (by write time) only until the
    cache holds at most that many bytes. This process then tries writing to
    the folder again if a write there failed before.

    Raises
    ------
    FileNotFoundError
        When ``location`` is not a folder.

    Examples
    --------
    >>> import tempfile
    >>> from skt import clear_cache
    >>> clear_cache(tempfile.mkdtemp())
    0
    """
    location = _existing_folder(location)
    root = location / _ROOT
    forget_memory()
    _UNWRITABLE.discard(os.path.abspath(location))
    if not root.is_dir():
        return 0
    if max_bytes is None:
        freed = sum(e.stat().st_size for e in _entries(root) if e.name != "config.json")
        shutil.rmtree(root)
        return freed
    return _prune(root, max_bytes)


def _prune(root: Path, max_bytes: int) -> int:
    """Delete the least recently written (or used) files under ``root`` down to ``max_bytes``."""
    files = [e for e in _entries(root) if e.name != "config.json"]
    stats = sorted((e.stat().st_mtime, e.stat().st_size, e.path) for e in files)
    total = sum(size for _, size, _ in stats)
    freed = 0
    for _, size, path in stats:
        if total - freed <= max_bytes:
            break
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            freed += size
    return freed


DEFAULT_CACHE_MAX_BYTES = 2**30
"""Size bound of skt's own cache folder (exported graphs) unless ``$SKT_CACHE_MAX_BYTES``
says otherwise."""


def default_cache_max_bytes() -> int | None:
    """The bound of skt's own folder: ``$SKT_CACHE_MAX_BYTES`` (``none``: no bound), else 1 GiB."""
    text = os.environ.get("SKT_CACHE_MAX_BYTES", "").strip()
    if not text:
        return DEFAULT_CACHE_MAX_BYTES
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"SKT_CACHE_MAX_BYTES={text!r}: give a number of bytes, or 'none' "
                         "for no bound.")
    return value


def bound_default_cache() -> int:
    """Keep skt's own cache folder within :func:`default_cache_max_bytes`; bytes freed.

    Exported graphs (13 to 45 MB each, one per network, size and layer list)
    would otherwise pile up there; the least recently used go first (a graph
    loaded from the folder counts as used). Feature caches given as
    ``cache=`` are the user's and are never pruned.
    """
    folder, budget = default_cache_dir(), default_cache_max_bytes()
    if folder is None or budget is None or not (folder / _ROOT).is_dir():
        return 0
    return _prune(folder / _ROOT, budget)


def mark_used(path: Path) -> None:
    """Note that a cached file was used, so that pruning keeps it longest."""
    with contextlib.suppress(OSError):
        os.utime(path)
