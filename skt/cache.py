"""A content-addressed, process-safe store of per-image layer summaries.

Three parts: content fingerprints of images (:func:`fingerprint`) and of
networks (:func:`fingerprint_module`); the store (:class:`FeatureCache`);
and its lookup/fill protocol (:meth:`FeatureCache.serve`): read what is
there, compute the rest under a lock, write it back.

Layout under the cache directory::

    skt-features/v<FORMAT>/<config>/config.json          what <config> describes
    skt-features/v<FORMAT>/<config>/<layer>/<ab>/<image>  one entry per image

``<config>`` hashes everything that changes a layer's output except the image:
the backbone, a hash of its actual weights, every preprocessing setting and
the compute dtype. ``<layer>`` hashes the layer name and the summary kind
(pooling statistics, or the whole map for ``pooling="flatten"``). ``<image>``
hashes the image content (see :func:`fingerprint`). Any change in
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
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from skt._utils import LRU, atomic_write

__all__ = ["FORMAT_VERSION", "MEMORY_BUDGET", "FeatureCache", "cache_info", "clear_cache",
           "default_cache_dir", "fingerprint", "fingerprint_module", "forget_memory",
           "open_cache"]

FORMAT_VERSION = 1
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


# ------------------------------------------------------------------ store --

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


Compute = Callable[[list[int]], Iterable[tuple[Sequence[int], Sequence[np.ndarray]]]]
Emit = Callable[[Sequence[int], Sequence[np.ndarray]], None]


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
            atomic_write(folder / "config.json",
                         json.dumps(description, indent=1, default=str).encode())
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
        payload, checksum = data[:-_CHECKSUM], data[-_CHECKSUM:]
        if len(data) > _CHECKSUM and _checksum(payload) == checksum:
            try:
                array = np.load(io.BytesIO(payload), allow_pickle=False)
            except ValueError:
                pass
            else:
                _remember(path, array)
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
        atomic_write(path, payload + _checksum(payload))
        _remember(path, array)

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


def _remember(path: Path, array: np.ndarray) -> None:
    array = np.array(array, copy=True)
    array.flags.writeable = False
    _MEMORY.put(str(path), array)


def forget_memory() -> None:
    """Drop the in-memory copies of entries (files on disk are untouched)."""
    _MEMORY.clear()


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
