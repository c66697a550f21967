"""Feature extraction over a Dask cluster, resumable partition by partition.

:func:`extract` cuts a list of image files into partitions, runs each
partition's :meth:`~skt.FeatureExtractor.transform_into` on a
``dask.distributed`` worker and writes its rows to the output folder;
:func:`load_features` reads the result as one memory-mapped array, in input
order. Needs the ``dask`` extra (``pip install skt[dask]``); importing this
module does not import Dask, the first call does.

The output folder (shared by the client and every worker: a network or
cluster file system) holds::

    manifest.json        what the job is, its partitions, the images skipped
    paths.jsonl          the image file of each row, one JSON string per line
    part-00000.npy       the features of each partition, float32
    part-00000.json      its record: rows, a digest of the .npy, of its files
    features.npy         all the rows, in input order (written last)

A partition is written under a temporary name and renamed when complete; its
record follows. A worker killed mid-partition (or a client that dies) loses
only the partitions in progress: the same call again checks every record
against its file and the image files (size, times), and computes only the
partitions that are missing, damaged or whose images changed. Another job
(other files or settings) in the same folder starts over.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import threading
import warnings
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np

from skt._utils import (
    atomic_open,
    atomic_write,
    expand_path,
    image_progress,
    jsonl_bytes,
    stat_digest,
)
from skt._version import __version__
from skt.extractor import FeatureExtractor

__all__ = ["extract", "job_key", "load_features"]

FORMAT = 1
"""Version of the folder layout; a folder of another version is a job to start over."""

MANIFEST = "manifest.json"
FEATURES = "features.npy"
PATHS = "paths.jsonl"

# Extractor parameters that change how the work runs, not its result.
NOT_IN_JOB = ("cache", "num_workers", "verbose")

_PREPARED = threading.Lock()  # one backbone build per worker process, whatever its threads


def job_key(extractor: FeatureExtractor, paths: Sequence[str], *extra: Any) -> str:
    """What makes two extractions one job: files, settings, weights, engine, and ``extra``.

    ``extractor`` is fitted; its weights' hash tells two random
    initialisations without a seed apart. Parameters that only change how
    the work runs (``cache``, ``num_workers``, ``verbose``) are left out.
    """
    params = {name: repr(value) for name, value in sorted(extractor.get_params().items())
              if name not in NOT_IN_JOB}
    digest = hashlib.blake2b(json.dumps(
        [__version__, params, extractor.engine_, extractor.n_features_out_,
         extractor._fingerprint, *extra]).encode(), digest_size=16)
    for path in paths:
        digest.update(os.fsencode(path) + b"\0")
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _partition_name(index: int) -> str:
    return f"part-{index:05d}"


def _extract_partition(extractor: FeatureExtractor, paths: list[str], start: int,
                       folder: str, name: str, job: str) -> dict:
    """On a worker: one partition's features to ``<name>.npy``, then its record.

    The scattered extractor is shared by the worker's threads: the first
    task builds its network (by name, from the weights on this machine);
    each task runs a shallow copy, so ``skipped_`` is its own.
    """
    with _PREPARED:
        extractor._get_runtime()
    worker = copy.copy(extractor)
    features = np.empty((len(paths), worker.n_features_out_), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the skipped images go in the record
        worker.transform_into(paths, features)
    target = Path(folder) / f"{name}.npy"
    with atomic_open(target, durable=True) as handle:
        np.save(handle, features, allow_pickle=False)
    record = {
        "job": job, "name": name, "start": start, "stop": start + len(paths),
        "digest": _file_digest(target), "files": stat_digest(paths).hexdigest(),
        "skipped": [[start + index, message] for index, message in worker.skipped_],
    }
    atomic_write(Path(folder) / f"{name}.json", json.dumps(record).encode(), durable=True)
    return record


def _is_done(folder: Path, name: str, job: str, start: int, stop: int,
             paths: Sequence[str]) -> dict | None:
    """The partition's record if its file is complete and its images unchanged, else None."""
    record = _read_json(folder / f"{name}.json")
    if (record is None or record.get("job") != job or record.get("start") != start
            or record.get("stop") != stop):
        return None
    try:
        if _file_digest(folder / f"{name}.npy") != record.get("digest"):
            return None
    except OSError:
        return None
    if stat_digest(paths[start:stop]).hexdigest() != record.get("files"):
        return None
    return record


def _start_over(folder: Path, job: str) -> None:
    """Remove what other jobs left here: their partitions and, if the manifest is
    theirs, the manifest and features (only skt's own file names)."""
    for record in folder.glob("part-*.json"):
        if record.stem[5:].isdigit() and (_read_json(record) or {}).get("job") != job:
            record.unlink(missing_ok=True)
            record.with_suffix(".npy").unlink(missing_ok=True)
    manifest = _read_json(folder / MANIFEST)
    if manifest is not None and manifest.get("job") != job:
        for name in (MANIFEST, FEATURES, PATHS):
            (folder / name).unlink(missing_ok=True)


def _client(client: Any) -> Any:
    """``client``, else the current Dask client, else None (the partitions run here)."""
    if client is not None:
        return client
    try:
        from distributed import Client
    except ImportError:
        return None
    try:
        return Client.current(allow_global=True)
    except ValueError:  # no client in this process
        return None


def _run(client: Any, extractor: FeatureExtractor, tasks: list[tuple], progress) -> tuple:
    """Run ``tasks`` (on the cluster, or here); their records and failures.

    Every partition runs to its end even when others fail, so that their
    work is kept.
    """
    records, failures = [], []
    if client is None:
        for task in tasks:
            try:
                records.append(_extract_partition(extractor, *task))
            except Exception as exc:  # reported with its partition below
                failures.append((task, exc))
            progress.update(len(task[0]))
        return records, failures
    from distributed import as_completed

    [shared] = client.scatter([extractor], broadcast=True, hash=False)
    futures = {client.submit(_extract_partition, shared, *task, pure=False): task
               for task in tasks}
    for future in as_completed(futures, loop=client.loop):  # client may not be the default
        task = futures[future]
        try:
            records.append(future.result())
        except Exception as exc:  # a task's error, or its worker's death
            failures.append((task, exc))
        progress.update(len(task[0]))
    return records, failures


def _raise_failed(failures: list[tuple], done: int, total: int) -> None:
    """One error for every failed partition: the first one's cause, and what to do."""
    (paths, start, _, name, _), exc = min(failures, key=lambda failure: failure[0][1])
    message = (f"{len(failures)} of {total} partitions failed; the first, {name} (images "
               f"{start} to {start + len(paths) - 1}: {paths[0]!r} ...), with "
               f"{type(exc).__name__}: {str(exc).rstrip('.')}. The {done} complete partitions "
               "are kept: fix the cause and call extract again with the same arguments to "
               "compute the rest.")
    kind = type(exc) if type(exc) in (ValueError, TypeError, OSError) else RuntimeError
    raise kind(message) from exc


def _write_features(folder: Path, records: list[dict], shape: tuple[int, int]) -> str:
    """``features.npy`` from the partitions, in input order; its digest."""
    with atomic_open(folder / FEATURES, durable=True) as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                     "fortran_order": False, "shape": shape})
        for record in sorted(records, key=lambda record: record["start"]):
            part = np.load(folder / f"{record['name']}.npy", mmap_mode="r")
            for begin in range(0, len(part), 1 << 14):  # bounded memory, any partition size
                handle.write(np.ascontiguousarray(part[begin:begin + (1 << 14)]).tobytes())
    return _file_digest(folder / FEATURES)


def extract(paths: Sequence[str | os.PathLike], extractor: FeatureExtractor,
            output: str | os.PathLike, *, client: Any = None, partition_size: int = 1024,
            verbose: int = 0) -> dict:
    """Extract the features of image files over a Dask cluster into a folder.

    Parameters
    ----------
    paths : sequence of str or path
        Image files, readable by every worker under these names.
    extractor : FeatureExtractor
        Fitted or not (then it is fitted here on ``paths``, which loads its
        network on the client once). It travels to the workers without its
        weights when they can be rebuilt by name (see
        :class:`~skt.FeatureExtractor`): each worker process builds the
        network once, on its first partition, and checks that its weights
        are those the extractor was fitted with. Its ``on_error`` applies: a
        partition with an unreadable image fails, naming the file
        (``"raise"``), or gives NaN rows listed in the manifest (``"skip"``).
    output : str or path
        The output folder (created if needed), on storage every worker and
        the client share.
    client : distributed.Client, optional
        The cluster to use; default the current client
        (``distributed.Client.current()``: the default one, or the one of a
        ``with client.as_current():`` block), or, without one, this
        process, one partition after another (same files).
    partition_size : int, default=1024
        Images per partition: per task, and what a killed worker loses.
    verbose : int, default=0
        1 shows a progress bar over images, updated per partition.

    Returns
    -------
    manifest : dict
        The content of ``manifest.json``: ``job`` (a key of the files and
        settings), ``n_images``, ``n_features``, ``feature_names``,
        ``partitions`` (name, start and stop row of each), ``skipped`` (a
        list of ``[row, path, message]``) and ``features_digest``; plus,
        for this call only, ``computed``: the partitions it computed (empty
        when everything was done already).

    Raises
    ------
    ValueError, TypeError, OSError or RuntimeError
        When partitions fail: one error for all, after every other partition
        has finished, naming the first failed partition, its first file and
        the cause (a ``distributed.KilledWorker`` for a worker that died
        while running it). What completed is kept.

    Examples
    --------
    >>> from distributed import Client, LocalCluster  # doctest: +SKIP
    >>> client = Client(LocalCluster(n_workers=2, threads_per_worker=1))  # doctest: +SKIP
    >>> manifest = skt.distributed.extract(paths, FeatureExtractor(), "features/")  # doctest: +SKIP
    >>> X = skt.distributed.load_features("features/")  # doctest: +SKIP
    """
    if not isinstance(extractor, FeatureExtractor):
        raise TypeError(f"extractor must be a skt.FeatureExtractor, not "
                        f"{type(extractor).__name__}.")
    if not isinstance(partition_size, Integral) or partition_size < 1:
        raise ValueError(f"partition_size must be a positive int; got {partition_size!r}.")
    for index, path in enumerate(paths):
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"paths[{index}] is a {type(path).__name__}; extract takes image "
                            "files (str or path) that every worker can read.")
    paths = [os.fspath(expand_path(path)) for path in paths]
    if not paths:
        raise ValueError("paths is empty: there is nothing to extract.")
    if not hasattr(extractor, "n_features_out_"):
        extractor = copy.deepcopy(extractor).fit(paths)
    folder = expand_path(output)
    folder.mkdir(parents=True, exist_ok=True)
    job = job_key(extractor, paths, partition_size, FORMAT)
    _start_over(folder, job)
    atomic_write(folder / PATHS, jsonl_bytes(paths))

    starts = range(0, len(paths), partition_size)
    bounds = [(start, min(start + partition_size, len(paths))) for start in starts]
    records, tasks = [], []
    for index, (start, stop) in enumerate(bounds):
        name = _partition_name(index)
        record = _is_done(folder, name, job, start, stop, paths)
        if record is None:
            tasks.append((paths[start:stop], start, os.fspath(folder), name, job))
        else:
            records.append(record)
    with image_progress(len(paths), extractor._label(), initial=len(paths) - sum(
            len(task[0]) for task in tasks), disable=not verbose) as progress:
        computed, failures = _run(_client(client), extractor, tasks, progress)
    records += computed
    if failures:
        _raise_failed(failures, len(records), len(bounds))

    manifest = _read_json(folder / MANIFEST)
    shape = (len(paths), extractor.n_features_out_)
    if (computed or manifest is None or manifest.get("job") != job
            or not _features_intact(folder, manifest, shape)):
        records.sort(key=lambda record: record["start"])
        manifest = {
            "format": FORMAT, "job": job, "n_images": shape[0], "n_features": shape[1],
            "feature_names": extractor.get_feature_names_out().tolist(),
            "partitions": [{"name": r["name"], "start": r["start"], "stop": r["stop"]}
                           for r in records],
            "skipped": [[row, paths[row], message] for r in records
                        for row, message in r["skipped"]],
            "features_digest": _write_features(folder, records, shape),
        }
        atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1).encode(), durable=True)
    return {**manifest, "computed": sorted(record["name"] for record in computed)}


def _features_intact(folder: Path, manifest: dict, shape: tuple[int, int]) -> bool:
    with contextlib.suppress(OSError, ValueError):
        features = np.load(folder / FEATURES, mmap_mode="r")
        return (features.shape == shape
                and _file_digest(folder / FEATURES) == manifest.get("features_digest"))
    return False


def load_features(output: str | os.PathLike, *, mmap_mode: str | None = "r") -> np.ndarray:
    """The features :func:`extract` wrote to ``output``: one array, in input order.

    Parameters
    ----------
    output : str or path
        The folder given to :func:`extract`.
    mmap_mode : {"r", "r+", "c"} or None, default="r"
        Memory-mapped (only the rows used are read from disk), or None to
        read the whole array into memory.

    Returns
    -------
    features : ndarray of shape (n_images, n_features), dtype float32
        Row ``i`` belongs to ``paths[i]`` (``paths.jsonl`` lists them); NaN
        for images skipped with ``on_error="skip"``.
    """
    folder = expand_path(output)
    manifest = _read_json(folder / MANIFEST)
    if manifest is None or manifest.get("format") != FORMAT:
        raise FileNotFoundError(
            f"{folder} holds no complete skt.distributed.extract output (no readable "
            f"{MANIFEST} of format {FORMAT}); run extract (again) with this folder.")
    features = np.load(folder / FEATURES, mmap_mode=mmap_mode, allow_pickle=False)
    expected = (manifest["n_images"], manifest["n_features"])
    if features.shape != expected or features.dtype != np.float32:
        raise ValueError(f"{folder / FEATURES} holds a {features.dtype} array of shape "
                         f"{features.shape}; the manifest expects float32 {expected}. Run "
                         "extract again with this folder: it rewrites the file.")
    return features
