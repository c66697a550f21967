"""A content-addressed, process-safe store of per-image layer summaries.

Layout under the cache directory::

    skt-features/v<FORMAT>/<config>/config.json          what <config> describes
    skt-features/v<FORMAT>/<config>/<layer>/<ab>/<image>  one entry per image

``<config>`` hashes everything that changes a layer's output except the image:
the backbone, a hash of its actual weights, every preprocessing setting and
the compute dtype. ``<layer>`` hashes the layer name and the summary kind
(pooling statistics, or the whole map for ``pooling="flatten"``). ``<image>``
hashes the image content (see :func:`skt.images.fingerprint`). Any change in
these misses, so nothing stale is returned.

Entries read or written by this process also stay in memory, up to
``MEMORY_BUDGET`` bytes, least recently used first out.

Each entry is an ``.npy`` payload followed by a 16-byte BLAKE2b checksum. It is
written to a temporary file and renamed into place, so concurrent writers and
processes killed mid-write never leave a partial entry under a real name; an
entry that fails its checksum is discarded with a warning and recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import threading
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FORMAT_VERSION", "FeatureCache", "cache_info", "clear_cache", "default_cache_dir",
           "open_cache"]

FORMAT_VERSION = 1
_ROOT = "skt-features"
_CHECKSUM = 16


def _hash(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _location(cache: Any) -> Path | None:
    if cache is None:
        return None
    location = getattr(cache, "location", cache)  # a joblib.Memory
    return None if location is None else Path(location)


def default_cache_dir() -> Path | None:
    """skt's own folder for exported ONNX graphs when no ``cache=`` is given.

    ``$SKT_CACHE_DIR``, else ``$XDG_CACHE_HOME/skt``, else ``~/.cache/skt``;
    None when it cannot be created (graphs then stay in memory).
    """
    folder = os.environ.get("SKT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "skt")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return None
    return Path(folder)


def open_cache(cache: Any) -> FeatureCache | None:
    """The cache for a ``cache=`` parameter: None, a directory or a ``joblib.Memory``."""
    location = _location(cache)
    return None if location is None else FeatureCache(location)


class _MemoryLayer:
    """Recently read or written entries of this process, up to a byte budget.

    Entries are content-addressed and never change once written, so a copy in
    memory cannot go stale; it saves the file read and checksum on each of the
    dozens of fits of a grid search.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.size = 0
        self.items: OrderedDict[str, np.ndarray] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key: str, value: np.ndarray) -> None:
        value = np.array(value, copy=True)
        value.flags.writeable = False
        with self.lock:
            if key in self.items:
                return
            self.items[key] = value
            self.size += value.nbytes
            while self.size > self.budget and self.items:
                self.size -= self.items.popitem(last=False)[1].nbytes


MEMORY_BUDGET = 256 * 2**20
_MEMORY = _MemoryLayer(MEMORY_BUDGET)


class FeatureCache:
    """Entries of one cache directory, with the most recent ones also in memory.

    Parameters
    ----------
    location : path
        Directory holding the cache; created on first write.
    """

    def __init__(self, location: str | os.PathLike) -> None:
        self.root = Path(location) / _ROOT / f"v{FORMAT_VERSION}"

    def config_key(self, description: dict[str, Any]) -> str:
        """Key of a configuration; records its description on first use."""
        key = _hash(description)
        folder = self.root / key
        if not (folder / "config.json").exists():
            folder.mkdir(parents=True, exist_ok=True)
            self._atomic_write(folder / "config.json",
                               json.dumps(description, indent=1, default=str).encode())
        return key

    def layer_folder(self, config: str, layer: str, kind: str) -> Path:
        """Folder of one layer's entries; an image's entry is ``<folder>/<ab>/<image>``."""
        return self.root / config / _hash(layer, kind)

    def path(self, config: str, layer: str, kind: str, image: str) -> Path:
        return self.layer_folder(config, layer, kind) / image[:2] / image

    def load(self, path: Path) -> np.ndarray | None:
        """The entry at ``path``, or None when it is missing or damaged."""
        remembered = _MEMORY.get(str(path))
        if remembered is not None:
            return remembered
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        payload, checksum = data[:-_CHECKSUM], data[-_CHECKSUM:]
        if len(data) > _CHECKSUM and _checksum(payload) == checksum:
            try:
                array = np.load(io.BytesIO(payload), allow_pickle=False)
            except ValueError:
                pass
            else:
                _MEMORY.put(str(path), array)
                return array
        warnings.warn(f"Discarding damaged feature-cache entry {path}; it will be recomputed.",
                      RuntimeWarning, stacklevel=2)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return None

    def save(self, path: Path, array: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        payload = buffer.getvalue()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._atomic_write(path, payload + _checksum(payload))
        _MEMORY.put(str(path), array)

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            temporary.write_bytes(data)
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()

    @contextlib.contextmanager
    def lock(self, config: str) -> Iterator[None]:
        """Hold an exclusive lock on one configuration (POSIX; no-op elsewhere).

        Parallel workers computing the same images wait for each other instead
        of running the backbone twice.
        """
        try:
            import fcntl
        except ImportError:  # Windows: entries stay correct, work may repeat
            yield
            return
        folder = self.root / config
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def forget_memory() -> None:
    """Drop the in-memory copies of entries (files on disk are untouched)."""
    with _MEMORY.lock:
        _MEMORY.items.clear()
        _MEMORY.size = 0


def _checksum(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=_CHECKSUM).digest()


def _entries(folder: Path) -> Iterator[os.DirEntry]:
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as scan:
            for entry in scan:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif not entry.name.startswith("."):
                    yield entry


def cache_info(location: str | os.PathLike) -> dict[str, Any]:
    """What a cache directory holds: totals and one row per configuration.

    Returns
    -------
    dict
        ``{"path", "entries", "graphs", "bytes", "configs": [{"key", "entries",
        "graphs", "bytes", "description"}, ...]}``: feature entries, exported ONNX
        graphs and bytes on disk (both kinds), configurations largest first.

    Examples
    --------
    >>> import tempfile
    >>> from skt import cache_info
    >>> cache_info(tempfile.mkdtemp())["entries"]
    0
    """
    root = Path(location) / _ROOT / f"v{FORMAT_VERSION}"
    configs = []
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            files = [e for e in _entries(folder) if e.name != "config.json"]
            graphs = [e for e in files if e.name.endswith(".onnx")]
            description_file = folder / "config.json"
            description = (json.loads(description_file.read_text())
                           if description_file.exists() else {})
            configs.append({"key": folder.name, "entries": len(files) - len(graphs),
                            "graphs": len(graphs),
                            "bytes": sum(e.stat().st_size for e in files),
                            "description": description})
    configs.sort(key=lambda c: c["bytes"], reverse=True)
    return {"path": str(Path(location)), "entries": sum(c["entries"] for c in configs),
            "graphs": sum(c["graphs"] for c in configs),
            "bytes": sum(c["bytes"] for c in configs), "configs": configs}


def clear_cache(location: str | os.PathLike, max_bytes: int | None = None) -> int:
    """Delete cached features; return the number of bytes freed.

    With ``max_bytes``, delete the oldest entries (by write time) only until the
    cache holds at most that many bytes.

    Examples
    --------
    >>> import tempfile
    >>> from skt import clear_cache
    >>> clear_cache(tempfile.mkdtemp())
    0
    """
    root = Path(location) / _ROOT
    forget_memory()
    if not root.is_dir():
        return 0
    if max_bytes is None:
        freed = sum(e.stat().st_size for e in _entries(root) if e.name != "config.json")
        shutil.rmtree(root)
        return freed
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
