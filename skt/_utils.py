"""Small helpers that several modules need, written once.

Imports nothing heavy at module level (no torch, no scikit-learn), so that
the command line and the cache can use it and still start fast.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Container, Hashable, Iterable, Iterator, MutableMapping
from pathlib import Path
from typing import IO, Any

__all__ = [
    "LRU",
    "atomic_open",
    "atomic_write",
    "available_cores",
    "close_matches",
    "cpu_flags",
    "cpu_info",
    "cpu_model",
    "expand_path",
    "huge_pages",
    "image_progress",
    "jsonl_bytes",
    "memory_format",
    "request_huge_pages",
    "resolve_num_workers",
    "stat_digest",
]


# ------------------------------------------------------------------ files --

def expand_path(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`~pathlib.Path`, with a leading ``~`` or ``~user`` expanded.

    Every path parameter and environment variable goes through here, so that
    ``cache="~/.cache/skt-features"`` means the home folder, not a folder
    named ``~`` in the working directory.

    Examples
    --------
    >>> import os
    >>> from skt._utils import expand_path
    >>> expand_path("~/data") == expand_path(os.path.expanduser("~")) / "data"
    True
    """
    try:
        return Path(path).expanduser()
    except RuntimeError as exc:  # "~user" of an unknown user, or no home folder at all
        raise ValueError(f"Cannot expand '~' in {os.fspath(path)!r} ({exc}); pass an "
                         "absolute path instead.") from exc


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, *, durable: bool = False) -> Iterator[IO[bytes]]:
    """A binary file handle whose content replaces ``path`` only once it is complete.

    Writes go to a hidden temporary file in the same folder, renamed over
    ``path`` when the block ends without an error, so readers and concurrent
    writers never see a partial file, and a process killed mid-write leaves
    the previous content (or nothing) under the real name. ``durable=True``
    also flushes the data to disk before the rename (for checkpoints, which a
    power cut must not lose).

    Raises
    ------
    OSError
        When the folder or file cannot be written (a full disk, a read-only
        folder); the error names ``path`` even where the operating system's
        own message (a failed ``write``) names no file.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        if exc.errno is None or exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    finally:
        with contextlib.suppress(OSError):  # gone already, or the folder turned read-only
            temporary.unlink()


def atomic_write(path: str | os.PathLike, data: bytes, *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_open`."""
    with atomic_open(path, durable=durable) as handle:
        handle.write(data)


def stat_digest(paths: Iterable[str], digest: Any = None) -> Any:
    """Extend a blake2b digest with the identity, size and times of each file.

    The status-change time is set by the system whenever a file is written or
    its times are set (``cp -p``, ``touch -r``), so a file rewritten at the
    same size with its old modification time still counts as changed. A
    missing file counts as such.
    """
    digest = digest or hashlib.blake2b(digest_size=16)
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:"
                          f"{stat.st_ctime_ns};".encode())
        except OSError:
            digest.update(b"-;")
    return digest


def jsonl_bytes(values: Iterable[Any]) -> bytes:
    """One JSON value per line, ASCII only: any file name survives, lone surrogates too."""
    return "".join(json.dumps(value) + "\n" for value in values).encode("ascii")


# --------------------------------------------------------------- progress --

def image_progress(total: int, label: str, *, initial: int = 0, disable: bool = False):
    """A tqdm bar over ``total`` images on standard error, ``skt <label>``.

    Off a terminal (a log file, CI), it is drawn when it starts and when it
    ends only, instead of hundreds of carriage-return updates.
    """
    import math
    import sys

    from tqdm.auto import tqdm

    terminal = getattr(sys.stderr, "isatty", lambda: False)()
    return tqdm(total=total, initial=initial, disable=disable, unit="img", desc=f"skt {label}",
                mininterval=0.1 if terminal else math.inf)


# ------------------------------------------------------------------ memory --

class LRU:
    """A least-recently-used map, safe to share between threads.

    Bounded by a number of items, by a byte budget (``size_of`` gives each
    value's size), or both; the least recently used items leave first.
    """

    def __init__(self, max_items: int | None = None, max_bytes: int | None = None,
                 size_of: Callable[[Any], int] = lambda value: 0) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.size_of = size_of
        self.nbytes = 0
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any:
        """The value of ``key`` (now the most recent), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        """Keep ``value`` under ``key`` unless the key is already there."""
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self.nbytes += self.size_of(value)
            while self._items and self._over_budget():
                self.nbytes -= self.size_of(self._items.popitem(last=False)[1])

    def get_or_make(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value of ``key``, made (outside the lock) and kept if missing."""
        value = self.get(key)
        if value is None:
            value = make()
            self.put(key, value)
            kept = self.get(key)  # another thread may have won the race
            value = value if kept is None else kept
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0

    def _over_budget(self) -> bool:
        return ((self.max_items is not None and len(self._items) > self.max_items)
                or (self.max_bytes is not None and self.nbytes > self.max_bytes))


# ------------------------------------------------------------- processors --

def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@functools.cache
def cpu_info(field: str) -> str:
    """The first ``field`` line of Linux's /proc/cpuinfo (``"model name"``, ``"flags"``);
    empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    """The CPU's name: /proc/cpuinfo's model name, or what ``platform`` knows."""
    import platform

    return cpu_info("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (Linux's /proc/cpuinfo names); empty elsewhere."""
    return frozenset(cpu_info("flags").split())


def resolve_num_workers(num_workers: int | None) -> int:
    """The estimators' ``num_workers``: None is one decoding thread per core, up to 4."""
    if num_workers is None:
        return max(1, min(4, available_cores()))
    return num_workers


def memory_format(device: Any) -> Any:
    """The memory format for 4-D activations on ``device``.

    Channels-last on the CPU, where oneDNN's convolutions run faster in it;
    contiguous (NCHW) elsewhere.
    """
    import torch

    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"
"""PyTorch's switch (2.1 and later) for transparent huge pages under its CPU
tensors of 2 MiB and more; read once, when torch allocates its first tensor."""


def request_huge_pages(environ: MutableMapping[str, str] | None = None,
                       modules: Container[str] | None = None) -> None:
    """Ask torch to put this process's large CPU tensors on transparent huge pages.

    Training allocates and frees gigabytes of activations at every step, and
    a forward pass hundreds of megabytes; on 4 KiB pages each one faults every
    page of them in again. On the 2-core EPYC of the README, whole-network
    fine-tuning epochs ran 1.66x faster on huge pages and torch-engine
    extraction 2.47x, for up to 17 % more peak memory
    (``benchmarks/bench_alloc.py``). The ``skt`` command calls this before
    it imports torch. It sets :data:`HUGE_PAGES_VARIABLE` to
    ``"1"`` unless the environment already sets it (``0`` opts out), and
    does nothing once torch is imported: torch may have read it already.
    ``environ`` and ``modules`` default to ``os.environ`` and ``sys.modules``.
    """
    import sys

    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if "torch" not in modules:
        environ.setdefault(HUGE_PAGES_VARIABLE, "1")


def huge_pages() -> str:
    """The kernel's transparent huge page mode, and whether torch is asked to use them.

    For example ``"madvise, torch asks"``: the kernel gives huge pages to
    memory that asks (:data:`HUGE_PAGES_VARIABLE` makes torch ask); with
    ``"never"`` the variable changes nothing. ``"unknown"`` off Linux.
    """
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as handle:
            text = handle.read()
        mode = text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        mode = "unknown"
    asks = os.environ.get(HUGE_PAGES_VARIABLE, "0") == "1"
    return f"{mode}, torch {'asks' if asks else 'does not ask'}"


# ------------------------------------------------------------------ errors --

def close_matches(name: str, candidates: Iterable[str], *, n: int = 6,
                  cutoff: float = 0.6) -> str:
    """`` Close matches: [...].`` for an error message, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=cutoff)
    return f" Close matches: {close}." if close else ""
