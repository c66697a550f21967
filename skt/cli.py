"""The ``skt`` command line: features, backbones and layers, ranking, comparisons, the cache.

Exit statuses:

0
    Success, ``--help`` and ``--version`` included; also ``skt extract
    --on-error skip`` that skipped unreadable images, which were asked to be
    skipped: their rows are NaN, they are listed (see below), and one line on
    stderr gives their number.
1
    The command failed: one line on stderr, ``skt: error: <what and what to
    do>``, and no traceback.
2
    A usage error (unknown option, missing argument, invalid choice):
    argparse's usage line, then ``skt: error: ...`` (``skt extract: error:
    ...`` for a command's own arguments); the convention of every argparse
    program.
130
    Interrupted with Ctrl-C (128 + SIGINT).
141
    The reader of the output went away (``skt backbones | head -1``): nothing
    more is printed, and the status is the one a shell reports for ``cat``,
    ``seq`` or ``grep`` killed by SIGPIPE in the same place (128 + SIGPIPE).
    Not 0, because a closed pipe can stop a command before its work is done:
    in ``skt extract ... -o f.npy 2>&1 | head -1`` the first progress line
    nobody reads ends the extraction, and 0 would vouch for an ``f.npy``
    that is not there yet. Not 1, which promises a message. A shell takes a
    pipeline's status from its last command, so ``skt backbones | head -1``
    succeeds unless ``set -o pipefail`` asks otherwise, as for those tools.

What ``skt extract ... -o f.npy`` writes:

``f.npy``
    float32 features, one row per image.
``f.paths.jsonl``
    The image file of each row, in row order: one JSON string per line. The
    file is ASCII (JSON escapes), so every name a filesystem allows comes
    back: newlines and tabs escaped, non-ASCII as ``\\uXXXX``, and bytes that
    are not UTF-8 as Python's surrogate escapes (``b"\\xff"`` is
    ``"\\udcff"``), which ``open`` accepts and ``os.fsencode`` turns back
    into the original bytes. :func:`read_jsonl` reads it; so does
    ``[json.loads(line) for line in open("f.paths.jsonl")]``.
``f.labels.jsonl``
    For a class-subfolder directory only: the class of each row, in the
    same format.
``f.skipped.jsonl``
    With ``--on-error skip`` only (empty when nothing was skipped): one JSON
    object ``{"index": row, "path": ..., "message": ...}`` per image that
    could not be read; its row of ``f.npy`` is NaN.

``-o f.npz`` writes one archive instead (``numpy.load``): ``features``,
``paths`` and, when there are, ``labels`` (arrays of str, holding any name
as above), and with ``--on-error skip`` ``skipped``, a structured array with
fields ``index``, ``path`` and ``message``. Archives of the same job are
byte-identical.

The outputs of an earlier run stay, untouched, until the new ones are
complete; then they are removed, the new paths, labels and skipped lists
are put in place, and the features file appears last: an ``f.npy``
(``f.npz``) never sits beside files of another run, and while it is absent
the run is not complete. A run in progress keeps its work in hidden files
beside the output, ``.f.npy.partial`` (the rows so far) and
``.f.npy.progress`` (which job, and how many rows are complete); a run
killed, interrupted or failed leaves them, and the same command on the same
files continues from the last complete batch, with the result an
uninterrupted run would give, byte for byte. (With ``--cache``, a kill in the
middle of writing a batch's entries makes the resumed run compute the rest
of that batch in smaller batches; where a network's results depend on a
batch's size at the last bit, those rows can differ by float rounding.) A different job starts over
and replaces them: other files, a file changed among those done, other
settings (``--cache`` and ``--num-workers`` aside), or ``--weights none``
without ``--random-state``, which draws new weights on every run.

``--dask tcp://HOST:8786`` runs the extraction on that Dask cluster
instead (:func:`skt.distributed.extract`; needs ``skt[dask]``), one task
per ``--partition-size`` images, and writes the same files. The image
files must be readable by every worker under the names given. Its work in
progress is the hidden folder ``.f.npy.parts`` beside the output, one file
per complete partition: a run killed, interrupted or failed (a worker died,
an image could not be read) keeps them, and the same command computes only
the partitions that are missing.

``--help``, ``--version`` and ``cache`` import neither torch nor scikit-learn,
nor numpy for the first two: each command imports what it needs when it runs,
so start-up stays a fraction of a second (``tests/test_cli.py`` checks the
imports).

Huge pages: before any command imports torch, ``skt`` sets
``THP_MEM_ALLOC_ENABLE=1`` unless the environment already sets it
(:func:`skt._utils.request_huge_pages`), so that torch's large CPU tensors
sit on transparent huge pages. On the README's 2-core machine, whole-network
fine-tuning epochs ran 1.66x and torch-engine extraction 2.47x faster, for
up to 17 % more peak memory (``benchmarks/bench_alloc.py``).
``THP_MEM_ALLOC_ENABLE=0 skt ...`` keeps 4 KiB pages.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from skt._utils import (
    expand_path,
    image_progress,
    jsonl_bytes,
    request_huge_pages,
    stat_digest,
)
from skt._version import __version__

__all__ = ["kill_and_resume", "main", "read_jsonl"]

CHUNK_SECONDS = 2.0
"""About how long ``skt extract`` works between two records of its progress:
at most what a killed run loses."""

_OPTIONS = {name: "--" + name.replace("_", "-") for name in (
    "backbone", "weights", "layers", "pooling", "image_size", "batch_size", "device",
    "num_workers", "cache", "engine", "random_state", "on_error")}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # archive members carry no run-dependent time


class CommandError(Exception):
    """A user-facing failure, printed as one line."""


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def _has_class_folders(folder: Path) -> bool:
    from skt.images import list_image_files

    return any(p.is_dir() and list_image_files(p) for p in folder.iterdir())


def collect_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """Image paths (and class labels) from files, globs and directories.

    A directory with class subfolders (``root/<class>/<image>``) gives labels;
    a flat directory gives its image files. Labels are returned only when
    every input was a class-subfolder directory.
    """
    from skt.images import list_image_files, load_image_folder

    paths: list[str] = []
    labels: list[str] = []
    all_labelled = True
    for entry in inputs:
        if entry.startswith("~") and not os.path.lexists(entry):  # quoted, so the shell left it
            entry = os.fspath(expand_path(entry))
        matches = sorted(glob.glob(entry)) if glob.has_magic(entry) else [entry]
        if not matches:
            raise CommandError(f"{entry!r} matches no file.")
        for match in matches:
            path = Path(match)
            if path.is_dir() and _has_class_folders(path):
                found, found_labels = load_image_folder(path)
                paths += found
                labels += found_labels.tolist()
            elif path.is_dir():
                found = list_image_files(path)
                if not found:
                    raise CommandError(f"{match!r} holds no image files.")
                paths += found
                all_labelled = False
            elif path.is_file():
                paths.append(str(path))
                all_labelled = False
            else:
                raise CommandError(f"{match!r} does not exist.")
    return paths, (labels if all_labelled and labels else None)


# ------------------------------------------------------- errors as options --

def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line; named by its type unless it is a usual one."""
    message = " ".join(str(exc).split())
    if isinstance(exc, CommandError | ValueError | TypeError | OSError | ImportError):
        return message or type(exc).__name__
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _option_value(match: re.Match) -> str:
    value = match["value"]
    value = "none" if value == "None" else shlex.quote(value[1:-1])
    return f"{_OPTIONS[match['name']]} {value}"


def _in_option_terms(message: str, backbone: str | None = None) -> str:
    """A library message reworded for the command line: options instead of parameters.

    ``device='cuda'`` becomes ``--device cuda``, "The 'image_size' parameter of
    FeatureExtractor must be" becomes "--image-size must be", and the Python
    calls that list names become the commands that do.
    """
    names = "|".join(_OPTIONS)
    message = re.sub(rf"\b(?P<name>{names})=(?P<value>'[^']*'|\"[^\"]*\"|None\b)",
                     _option_value, message)
    message = re.sub(rf"The '(?P<name>{names})' parameter of \w+ must be (?P<what>.+?)"
                     r"(?: or None)?\. Got (?P<got>.+?) instead\.",
                     lambda m: f"{_OPTIONS[m['name']]} must be {m['what']}; got {m['got']}.",
                     message)
    message = message.replace("skt.list_layers(backbone)", f"'skt layers {backbone}'")
    return message.replace("skt.list_backbones() lists the valid names; an nn.Module instance "
                           "is accepted too.", "'skt backbones' lists the valid names.")


def _renumbered(message: str, offset: int) -> str:
    """A message about item ``i`` of a chunk, about row ``offset + i`` of the whole run."""
    return re.sub(r"\bImage (\d+)\b", lambda m: f"Image {int(m[1]) + offset}", message,
                  count=1)


@contextlib.contextmanager
def _speaking_options(backbone: str | None = None, offset: int = 0) -> Iterator[None]:
    """Turn what the library raises into a one-line CommandError in the command's terms.

    ``offset``: the row of the first item the library was given.
    """
    try:
        yield
    except (BrokenPipeError, CommandError):
        raise
    except Exception as exc:
        message = _in_option_terms(_one_line(exc), backbone)
        raise CommandError(_renumbered(message, offset)) from exc


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


# ------------------------------------------------------------------ extract --

def _extractor(args: argparse.Namespace):
    from skt import FeatureExtractor

    layers = args.layers.split(",") if args.layers else None
    weights = None if args.weights.lower() == "none" else args.weights
    return FeatureExtractor(
        backbone=args.backbone, weights=weights, layers=layers, pooling=args.pooling,
        image_size=args.image_size, batch_size=args.batch_size, device=args.device,
        num_workers=args.num_workers, cache=args.cache, engine=args.engine,
        precision=args.precision, random_state=args.random_state, on_error=args.on_error,
        verbose=0,
    )


def _hidden(path: Path, role: str) -> Path:
    return path.with_name(f".{path.name}.{role}")



def _job_key(output: Path, paths: Sequence[str], labels, extractor) -> str:
    """What makes two runs one job: same inputs, settings, weights and kind of output."""
    from skt.distributed import job_key

    return job_key(extractor, paths, output.suffix, labels)


class _Staging:
    """The hidden files of an unfinished ``skt extract`` beside its output.

    ``.<output>.partial`` holds the features so far (a ``.npy`` memmap of the
    final shape); ``.<output>.progress`` is JSON: the job's key, how many rows
    are complete, a digest of the size and modification time of their files,
    and the images skipped among them. The progress is rewritten (atomically)
    only after the rows it counts are flushed to disk.
    """

    def __init__(self, output: Path, job: str, paths: Sequence[str], n_features: int) -> None:
        self.output = output
        self.job = job
        self.paths = paths
        self.shape = (len(paths), n_features)
        self.features_path = _hidden(output, "partial")
        self.progress_path = _hidden(output, "progress")
        self.rows = 0
        self.skipped: list[tuple[int, str]] = []
        self._done = hashlib.blake2b(digest_size=16)

    def open(self):
        """The staged features: an unfinished run's of the same job, else new ones."""
        import numpy as np

        state = _read_progress(self.progress_path)
        if state is not None and state.get("job") == self.job and state["rows"] <= len(self.paths):
            rows = state["rows"]
            done = stat_digest(self.paths[:rows])
            features = _open_staged(self.features_path, self.shape)
            if features is not None and done.hexdigest() == state["done"]:
                self.rows, self._done = rows, done
                self.skipped = [(int(index), str(message)) for index, message in state["skipped"]]
                return features
        self.progress_path.unlink(missing_ok=True)
        return np.lib.format.open_memmap(self.features_path, mode="w+", dtype=np.float32,
                                         shape=self.shape)

    def record(self, rows: int, skipped: Sequence[tuple[int, str]]) -> None:
        """Count ``rows`` as complete; their features must be on disk already."""
        stat_digest(self.paths[self.rows:rows], self._done)
        self.rows = rows
        self.skipped += skipped
        state = {"job": self.job, "rows": rows, "done": self._done.hexdigest(),
                 "skipped": self.skipped}
        _write_synced(self._progress_draft, json.dumps(state).encode())
        os.replace(self._progress_draft, self.progress_path)

    @property
    def _progress_draft(self) -> Path:
        # one fixed name, so that a draft left by a killed run is overwritten, not piled up
        return self.progress_path.with_name(f"{self.progress_path.name}.partial")

    def discard(self) -> None:
        for path in (self.features_path, self.progress_path, self._progress_draft):
            path.unlink(missing_ok=True)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _read_progress(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    complete = isinstance(state, dict) and {"job", "rows", "done", "skipped"} <= state.keys()
    return state if complete and isinstance(state["rows"], int) else None


def _recorded_rows(progress: Path) -> int:
    return (_read_progress(progress) or {"rows": 0})["rows"]


def _open_staged(path: Path, shape: tuple[int, int]):
    import numpy as np

    try:
        features = np.lib.format.open_memmap(path, mode="r+")
    except (OSError, ValueError):
        return None
    return features if features.shape == shape and features.dtype == np.float32 else None


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The values of a ``.jsonl`` file written by ``skt extract``, in row order.

    ``f.paths.jsonl`` and ``f.labels.jsonl`` give str, ``f.skipped.jsonl``
    dicts. A file name that is not valid UTF-8 comes back as Python's
    surrogate-escaped str: ``open`` and ``os`` functions accept it, and
    ``os.fsencode`` gives its original bytes.

    Examples
    --------
    >>> import json, os, tempfile
    >>> from skt.cli import read_jsonl
    >>> name = os.fsdecode(b"line\\nbreak \\xff.png")
    >>> path = os.path.join(tempfile.mkdtemp(), "f.paths.jsonl")
    >>> with open(path, "w") as handle:
    ...     _ = handle.write(json.dumps(name) + "\\n")
    >>> os.fsencode(read_jsonl(path)[0])
    b'line\\nbreak \\xff.png'
    """
    with open(path, encoding="ascii") as handle:
        return [json.loads(line) for line in handle]


def _extract_rows(extractor, staging: _Staging, features, skip: bool, backbone: str) -> None:
    """Fill the staged rows chunk by chunk, recording each chunk once it is on disk.

    Chunks are whole batches, so every batch holds the images it would in an
    uninterrupted run (torch results can depend on a batch's company), and
    grow until one takes about ``CHUNK_SECONDS``.
    """
    paths, total, batch = staging.paths, staging.shape[0], extractor.batch_size
    batches, shown = 1, set()
    with image_progress(total, backbone, initial=staging.rows) as bar:
        while staging.rows < total:
            start, began = staging.rows, time.monotonic()
            stop = min(total, start + batches * batch)
            with (warnings.catch_warnings(record=True) as caught,
                  _speaking_options(backbone, offset=start)):
                warnings.simplefilter("always")
                extractor.transform_into(paths[start:stop], features[start:stop])
            skipped = ([(start + i, _renumbered(message, start))
                        for i, message in extractor.skipped_] if skip else [])
            _show_warnings(caught, shown, bar, drop_skip_count=bool(skipped))
            features.flush()
            staging.record(stop, skipped)
            bar.update(stop - start)
            elapsed = max(time.monotonic() - began, 1e-3)
            batches = max(1, min(2 * batches, int(batches * CHUNK_SECONDS / elapsed)))


def _show_warnings(caught, shown: set[str], bar, *, drop_skip_count: bool) -> None:
    """Each distinct warning once, as one line; the extractor's count of skipped
    images is left to the summary at the end."""
    for warning in caught:
        message = " ".join(str(warning.message).split())
        if drop_skip_count and warning.category is UserWarning and message.startswith("Skipped "):
            continue
        if message not in shown:
            shown.add(message)
            bar.write(f"skt: warning: {message}", file=sys.stderr)


def _npz_member(name: str) -> zipfile.ZipInfo:
    member = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    member.external_attr = 0o644 << 16
    return member


def _write_npz(archive: Path, staged: Path, arrays: dict[str, Any]) -> None:
    """What ``numpy.savez`` writes, reproducibly, with the features copied from disk."""
    import numpy as np

    with open(archive, "wb") as handle:
        with zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as zipped:
            with (open(staged, "rb") as source,
                  zipped.open(_npz_member("features.npy"), "w", force_zip64=True) as member):
                shutil.copyfileobj(source, member, 1 << 20)
            for name, values in arrays.items():
                with zipped.open(_npz_member(f"{name}.npy"), "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, values, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())


def _skipped_array(skipped: Sequence[tuple[int, str]], paths: Sequence[str]):
    import numpy as np

    rows = [(index, paths[index], message) for index, message in skipped]
    longest = [max((len(row[field]) for row in rows), default=1) for field in (1, 2)]
    return np.array(rows, dtype=[("index", np.int64), ("path", f"<U{longest[0]}"),
                                 ("message", f"<U{longest[1]}")])


def _put_in_place(output: Path, staged: Path, siblings: dict[Path, bytes | None]) -> None:
    """Replace ``output`` and its sibling files by the new ones, features last.

    Siblings with None are only removed (left by an earlier run). The old
    output goes first, so old features never sit beside new siblings, and new
    features appear only once their siblings are in place.
    """
    written = {}
    for path, data in siblings.items():
        if data is not None:
            written[path] = _hidden(path, "partial")
            _write_synced(written[path], data)
    if siblings:
        output.unlink(missing_ok=True)
    for path in siblings:
        path.unlink(missing_ok=True)
    for path, temporary in written.items():
        os.replace(temporary, path)
    os.replace(staged, output)


def _finish(output: Path, features: Path, paths: Sequence[str], labels,
            skipped: list[tuple[int, str]] | None) -> None:
    """Put the staged ``features`` and the paths, labels and skipped lists in place."""
    import numpy as np

    if output.suffix == ".npy":
        records = [{"index": index, "path": paths[index], "message": message}
                   for index, message in skipped or ()]
        _put_in_place(output, features, {
            output.with_suffix(".paths.jsonl"): jsonl_bytes(paths),
            output.with_suffix(".labels.jsonl"): None if labels is None else jsonl_bytes(labels),
            output.with_suffix(".skipped.jsonl"): None if skipped is None else jsonl_bytes(records),
            # the names of earlier versions, which could not hold every file name
            output.with_suffix(".paths.txt"): None,
            output.with_suffix(".labels.txt"): None,
        })
    else:
        arrays = {"paths": np.asarray(paths, dtype=str)}
        if labels is not None:
            arrays["labels"] = np.asarray(labels, dtype=str)
        if skipped is not None:
            arrays["skipped"] = _skipped_array(skipped, paths)
        archive = _hidden(output, "archive")
        _write_npz(archive, features, arrays)
        _put_in_place(output, archive, {})


def _report_skipped(output: Path, count: int, total: int) -> None:
    where = (output.with_suffix(".skipped.jsonl") if output.suffix == ".npy"
             else f"the 'skipped' array of {output}")
    print(f"skt: skipped {count} of {total} images that could not be read; their "
          f"rows are NaN and {where} lists them", file=sys.stderr)


def cmd_extract(args: argparse.Namespace) -> None:
    output = expand_path(args.output)
    if output.suffix not in (".npy", ".npz"):
        raise CommandError(f"-o {args.output!r}: the output must end in .npy or .npz.")
    client = _dask_client(args.dask) if args.dask else None
    paths, labels = collect_inputs(args.inputs)
    with _speaking_options(args.backbone):
        extractor = _extractor(args).fit(paths)
    output.parent.mkdir(parents=True, exist_ok=True)
    if client is not None:
        skipped = _extract_on_cluster(client, extractor, paths, labels, output, args)
    else:
        skipped = _extract_here(extractor, paths, labels, output, args)
    if skipped:
        _report_skipped(output, len(skipped), len(paths))
    where = f"Dask cluster at {args.dask}, " if client is not None else ""
    print(f"wrote {len(paths)} x {extractor.n_features_out_} features ({where}"
          f"{extractor.engine_} engine) to {output}", file=sys.stderr)


def _extract_here(extractor, paths: list[str], labels, output: Path,
                  args: argparse.Namespace) -> list[tuple[int, str]]:
    """In this process, batch by batch, resumable from the hidden files beside ``output``."""
    staging = _Staging(output, _job_key(output, paths, labels, extractor), paths,
                       extractor.n_features_out_)
    features = staging.open()
    if staging.rows:
        print(f"skt: resuming {output} from image {staging.rows} of {len(paths)}",
              file=sys.stderr)
    skip = args.on_error == "skip"
    try:
        _extract_rows(extractor, staging, features, skip, args.backbone)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{staging.rows} of {len(paths)} images are done; the same "
                                "command resumes") from None
    del features  # the memmap is flushed: close it before it is renamed
    _finish(output, staging.features_path, paths, labels, staging.skipped if skip else None)
    staging.discard()
    return staging.skipped


def _dask_client(address: str):
    """A client of the Dask scheduler at ``address``, or a CommandError saying what to do."""
    try:
        from distributed import Client
    except ImportError:
        raise CommandError("--dask needs Dask's distributed scheduler: pip install "
                           "'skt[dask]'.") from None
    try:
        return Client(address)  # waits distributed.comm.timeouts.connect (30 s) at most
    except (OSError, TimeoutError, ValueError) as exc:
        raise CommandError(f"--dask {address}: cannot reach a Dask scheduler there "
                           f"({_one_line(exc)}). Start one with 'dask scheduler' and workers "
                           f"with 'dask worker {address}', or leave --dask out to extract "
                           "in this process.") from None


def _extract_on_cluster(client, extractor, paths: list[str], labels, output: Path,
                        args: argparse.Namespace) -> list[tuple[int, str]]:
    """Partitions on the cluster's workers (:func:`skt.distributed.extract`), kept in the
    hidden folder ``.f.npy.parts`` beside ``output`` until the run is complete."""
    from skt.distributed import FEATURES
    from skt.distributed import extract as extract_on_cluster

    parts = _hidden(output, "parts")
    try:
        with client, _speaking_options(args.backbone):
            manifest = extract_on_cluster(paths, extractor, parts, client=client,
                                          partition_size=args.partition_size, verbose=1)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("the partitions that are complete are kept; the same command "
                                "resumes") from None
    skipped = [(row, message) for row, _, message in manifest["skipped"]]
    _finish(output, parts / FEATURES, paths, labels,
            skipped if args.on_error == "skip" else None)
    shutil.rmtree(parts)
    return skipped


def kill_and_resume(argv: Sequence[str], *, after_rows: int = 1, delay: float = 0.0,
                    env: dict[str, str] | None = None, timeout: float = 300.0,
                    inspect: Callable[[int], Any] | None = None) -> tuple[int, int, str]:
    """Kill ``skt extract`` with SIGKILL mid-run, then run the same command again.

    ``argv`` is a ``skt extract ...`` command line (without ``skt``). It runs
    as ``python -m skt`` in a child process (with ``env``), which is killed
    ``delay`` seconds after its progress file counts ``after_rows`` complete
    rows; ``inspect(rows)``, if given, looks at what the kill left; then the
    same command runs in this process, through :func:`main`. POSIX only.
    ``tests/test_faults.py`` compares the result with an uninterrupted run's.

    Returns
    -------
    rows : int
        Rows the progress file counted when the child died.
    status : int
        Exit status of the second run.
    stderr : str
        What the second run printed on stderr.

    Raises
    ------
    RuntimeError
        The child ended before it could be killed (too little work, or an
        error: its stderr is quoted).
    TimeoutError
        The child counted fewer than ``after_rows`` rows in ``timeout`` seconds.
    """
    import io
    import signal
    import subprocess
    import tempfile

    progress = _hidden(Path(build_parser().parse_args(list(argv)).output), "progress")
    if progress.exists():
        raise ValueError(f"{progress} exists: an unfinished run of this output is pending.")
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryFile() as log:
        child = subprocess.Popen([sys.executable, "-m", "skt", *argv], env=env,
                                 stdout=subprocess.DEVNULL, stderr=log)
        try:
            while _recorded_rows(progress) < after_rows and child.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"skt {shlex.join(argv)} recorded no {after_rows} rows "
                                       f"in {timeout} s")
                time.sleep(0.002)
            time.sleep(delay)
        finally:
            child.kill()
            child.wait()
        if child.returncode != -signal.SIGKILL:
            log.seek(0)
            raise RuntimeError(f"skt {shlex.join(argv)} ended with status {child.returncode} "
                               f"before it could be killed: {log.read().decode(errors='replace')}")
    rows = _recorded_rows(progress)
    if inspect is not None:
        inspect(rows)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main(argv)
    return rows, status, stderr.getvalue()


# ---------------------------------------------------------- other commands --

def cmd_backbones(args: argparse.Namespace) -> None:
    from skt.backbones import list_backbones, weights_available_offline

    for name in list_backbones():
        offline = "weights on disk" if weights_available_offline(name) else "download needed"
        print(f"{name:28s} {offline}")


def _format_shape(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else str(tuple(shape))


def cmd_layers(args: argparse.Namespace) -> None:
    from skt.backbones import family_of, layer_shapes, resolve_preprocessing

    try:
        with _speaking_options(args.backbone):
            shapes = layer_shapes(args.backbone, image_size=args.image_size)
    except CommandError as exc:
        raise CommandError(str(exc).replace("pass an image_size", "pass an --image-size")) from exc
    family = family_of(args.backbone)
    size = resolve_preprocessing(family.preprocessing(args.backbone, None),
                                 args.image_size).crop_size
    width = max(len("layer"), *map(len, shapes))
    print(f"{'layer':<{width}}  output shape for one {size} x {size} image")
    for name, shape in shapes.items():
        print(f"{name:<{width}}  {_format_shape(shape)}")


def cmd_rank(args: argparse.Namespace) -> None:
    from skt.transferability import rank_backbones

    paths, labels = collect_inputs(args.inputs)
    if labels is None:
        raise CommandError("skt rank needs labels: give a folder with one subfolder per class "
                           "(folder/<class>/<image>).")
    layers = None if args.layers is None else [
        None if name == "pre_logits" else name for name in args.layers.split(",")]
    table = rank_backbones(paths, labels, args.backbones.split(","), layers=layers,
                           metric=args.metric, cache=args.cache, image_size=args.image_size,
                           batch_size=args.batch_size)
    rows = table.to_dict("records") if hasattr(table, "to_dict") else table
    width = max(len(row["backbone"]) + len(row["layer"]) + 1 for row in rows)
    print(f"{'backbone:layer':<{width}}  {args.metric:>8}  {'seconds':>7}")
    for row in rows:
        error = row["error"] if isinstance(row["error"], str) else None
        score = "-" if error else f"{row['score']:.4f}"
        line = f"{row['backbone'] + ':' + row['layer']:<{width}}  {score:>8}  {row['seconds']:7.1f}"
        print(f"{line}  {error}" if error else line)


def cmd_cache(args: argparse.Namespace) -> None:
    from skt.cache import cache_info, clear_cache

    location = expand_path(args.path)
    if not location.exists():
        raise CommandError(f"{args.path!r} does not exist.")
    if not location.is_dir():
        raise CommandError(f"{args.path!r} is not a directory.")
    if args.action == "clear":
        freed = clear_cache(location, max_bytes=args.max_bytes)
        print(f"freed {_human(freed)} in {args.path}")
        return
    info = cache_info(location)
    graphs = f", {info['graphs']} exported graphs" if info["graphs"] else ""
    print(f"{info['path']}: {info['entries']} entries{graphs}, {_human(info['bytes'])}")
    for config in info["configs"]:
        description = config["description"]
        if "error" in description:
            print(f"  {config['key']}  {description['error']}  {config['entries']} entries  "
                  f"{_human(config['bytes'])}")
            continue
        preprocessing = description.get("preprocessing", {})
        print(f"  {config['key']}  {description.get('backbone')}  "
              f"{description.get('weights')}  {preprocessing.get('crop_size')} px  "
              f"{config['entries']} entries  {_human(config['bytes'])}")


def cmd_demo(args: argparse.Namespace) -> None:
    from skt.bench.demo import run_demo

    run_demo(quick=args.quick, output=args.output)


def cmd_compare(args: argparse.Namespace) -> None:
    from skt.bench.demo import compare_folder

    weights = None if args.weights.lower() == "none" else args.weights
    with _speaking_options(args.backbone):
        compare_folder(args.folder, backbone=args.backbone, weights=weights,
                       image_size=args.image_size, quick=args.quick,
                       finetune=args.finetune, test_size=args.test_size,
                       random_state=args.random_state, output=args.output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skt", description="Pretrained CNN features for scikit-learn.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    extract = commands.add_parser(
        "extract", help="features of image files to .npy/.npz",
        description="Extract features of image files. -o f.npy also writes f.paths.jsonl, "
                    "the file of each row as one JSON string per line (ASCII, so any file "
                    "name survives; read it with skt.cli.read_jsonl(path) or "
                    "[json.loads(line) for line in open(path)]) and, for a directory in "
                    "class-subfolder layout, f.labels.jsonl likewise; -o f.npz holds "
                    "features, paths and labels arrays. The features file appears last, "
                    "once the run is complete; a run killed or interrupted resumes from its "
                    "last complete batch when the same command runs again.")
    extract.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="image files, globs or directories")
    extract.add_argument("-o", "--output", required=True, help="features.npy or features.npz")
    extract.add_argument("--backbone", default="efficientnet_lite0",
                         help="a name from 'skt backbones' (default: %(default)s)")
    extract.add_argument("--weights", default="DEFAULT",
                         help="DEFAULT, a weights name, a state-dict path, or none")
    extract.add_argument("--layers", help="comma-separated names from 'skt layers BACKBONE' "
                                          "(default: penultimate)")
    extract.add_argument("--pooling", default="avg",
                         choices=["avg", "max", "gem", "avgmax", "flatten"])
    extract.add_argument("--image-size", type=_at_least(1),
                         help="crop size in pixels (default: the weights')")
    extract.add_argument("--batch-size", type=_at_least(1), default=32)
    extract.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 or mps")
    extract.add_argument("--num-workers", type=_at_least(0), default=None,
                         help="decoding threads (default: one per core, up to 4)")
    extract.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx"],
                         help="auto: the faster on this machine, measured once per "
                              "configuration (default)")
    extract.add_argument("--precision", default="float32",
                         choices=["float32", "bfloat16", "float16", "int8"],
                         help="int8: ONNX Runtime quantisation calibrated on up to 64 of the "
                              "images; bfloat16: where the CPU or GPU has it (default: "
                              "%(default)s)")
    extract.add_argument("--cache", help="feature cache directory")
    extract.add_argument("--random-state", type=_at_least(0),
                         help="seed of the random initialisation with --weights none")
    extract.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                         help="skip: NaN rows for images that cannot be read, listed in "
                              "f.skipped.jsonl (the 'skipped' array of f.npz); exit status "
                              "0 (default: raise, exit status 1)")
    extract.add_argument("--dask", metavar="ADDRESS",
                         help="run on the Dask cluster whose scheduler is at ADDRESS "
                              "(tcp://host:8786), partition by partition; needs skt[dask] and "
                              "image files every worker can read under the same names")
    extract.add_argument("--partition-size", type=_at_least(1), default=1024,
                         help="images per Dask task with --dask (default: %(default)s)")
    extract.set_defaults(run=cmd_extract)

    backbones = commands.add_parser("backbones", help="list backbone names")
    backbones.set_defaults(run=cmd_backbones)

    layers = commands.add_parser(
        "layers", help="list the layers of a backbone and their output shapes",
        description="List the layer names 'skt extract --layers' accepts, in forward order, "
                    "with each layer's output shape for one image, batch dimension left out: "
                    "(C, H, W) for feature maps, (T, C) for tokens, (D,) for vectors, - for "
                    "outputs that are not tensors. The shapes come from one pass on "
                    "PyTorch's meta device (no weights, no download).")
    layers.add_argument("backbone", help="a name from 'skt backbones'")
    layers.add_argument("--image-size", type=_at_least(1),
                        help="side of the input image (default: the weights' crop size)")
    layers.set_defaults(run=cmd_layers)

    rank = commands.add_parser(
        "rank", help="rank backbones by transferability on labelled images",
        description="Score each backbone (and layer) on a class-subfolder folder by LogME or "
                    "H-score, without training anything, best first (skt.transferability). A "
                    "backbone whose weights are not on this machine is listed last with the "
                    "reason; the others still rank.")
    rank.add_argument("inputs", nargs="+", metavar="FOLDER",
                      help="a folder with one subfolder per class")
    rank.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,"
                      "efficientnet_lite2", help="comma-separated names (default: %(default)s)")
    rank.add_argument("--layers", help="comma-separated layer names tried in every backbone; "
                      "pre_logits for the penultimate features (default)")
    rank.add_argument("--metric", default="logme", choices=["logme", "hscore"])
    rank.add_argument("--cache", help="feature cache directory")
    rank.add_argument("--image-size", type=_at_least(16),
                      help="crop size in pixels (default: each backbone's weights')")
    rank.add_argument("--batch-size", type=_at_least(1), default=32)
    rank.set_defaults(run=cmd_rank)

    cache = commands.add_parser("cache", help="show or clear a feature cache")
    cache.add_argument("action", choices=["info", "clear"])
    cache.add_argument("path")
    cache.add_argument("--max-bytes", type=_at_least(0),
                       help="with clear: delete oldest entries down to this size")
    cache.set_defaults(run=cmd_cache)

    demo = commands.add_parser(
        "demo", help="compare heads and fine-tuning on real images (ELPV solar cells)",
        description="Raw pixels, frozen EfficientNet-Lite0 features with three heads, and "
                    "fine-tuning, against published results, on the ELPV solar cells; needs "
                    "skt[bench]. 'skt compare FOLDER' does the same on your own images.")
    demo.add_argument("--quick", action="store_true", help="a small subset, in under 2 minutes")
    demo.add_argument("--output", default="demo-results",
                      help="folder for results.json, .md, .png and the feature cache "
                           "(default: %(default)s)")
    demo.set_defaults(run=cmd_demo)

    compare = commands.add_parser(
        "compare", help="the demo's comparison on your own class-subfolder images",
        description="On FOLDER/<class>/<image>, one stratified train/test split: majority "
                    "class; raw pixels + LogisticRegression, LinearSVC, PCA + LDA; frozen "
                    "features of --backbone + LogisticRegression, SVC, PCA + LDA (each head "
                    "tuned by grid search on the training part); and the backbone "
                    "fine-tuned (the demo's settings: 6 epochs, freeze='auto'). Prints "
                    "accuracy, balanced accuracy, macro-F1, ROC-AUC (macro one-vs-rest for "
                    "more than two classes) and fit and predict seconds per row, and writes "
                    "results.json, results.md and results.png (with matplotlib) to --output. "
                    "Every class needs 8 or more images (75/25 split, 5-fold searches).")
    compare.add_argument("folder", metavar="FOLDER", help="a folder with one subfolder per class")
    compare.add_argument("--backbone", default="efficientnet_lite0",
                         help="a name from 'skt backbones' (default: %(default)s)")
    compare.add_argument("--weights", default="DEFAULT",
                         help="DEFAULT, a weights name, a state-dict path, or none (random, "
                              "seeded by --random-state)")
    compare.add_argument("--image-size", type=_at_least(16),
                         help="crop size of the feature and fine-tuned rows (default: 224; "
                              "160 and 64 with --quick)")
    compare.add_argument("--quick", action="store_true",
                         help="the demo's quick settings: at most 400 images, 3-fold searches, "
                              "1 epoch of fine-tuning")
    compare.add_argument("--no-finetune", dest="finetune", action="store_false",
                         help="leave out the fine-tuned row (the slowest)")
    compare.add_argument("--test-size", type=_fraction, default=0.25,
                         help="held-out share of the images (default: %(default)s)")
    compare.add_argument("--random-state", type=_at_least(0), default=0,
                         help="seed of the split, the searches and fine-tuning "
                              "(default: %(default)s)")
    compare.add_argument("--output", default="compare-results",
                         help="folder for results.json, .md, .png and the feature cache "
                              "(default: %(default)s)")
    compare.set_defaults(run=cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``skt`` and ``python -m skt``; returns the exit status (see above)."""
    request_huge_pages()  # before any command imports torch; see "Huge pages" above
    try:
        status = _parse_and_run(argv)
        sys.stdout.flush()  # so a closed pipe is met here, not while Python exits
    except BrokenPipeError:
        _discard_unwritable_output()
        return 141
    except KeyboardInterrupt as exc:
        print(f"skt: interrupted; {exc}" if str(exc) else "skt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # whatever the cause, one line and no traceback
        print(f"skt: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    return status


def _parse_and_run(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: 0 after --help and --version, 2 for usage errors
        return int(exc.code or 0)
    args.run(args)
    return 0


def _discard_unwritable_output() -> None:
    """Point stdout and stderr, if their pipe is closed, at os.devnull.

    What is still buffered for a closed pipe would otherwise fail again when
    Python flushes it at exit: "Exception ignored ... BrokenPipeError" and
    status 120 (the recipe in
    https://docs.python.org/3/library/signal.html#note-on-sigpipe).
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
