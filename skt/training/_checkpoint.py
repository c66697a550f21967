"""Checkpoint files: a training state written atomically, read back to resume.

A file is one line of text, ``skt-checkpoint <format> blake2b <digest>``,
then the state as :func:`torch.save` writes it. The digest covers those
bytes, so a file damaged on disk or in a copy is refused before anything in
it is read with :func:`torch.load` or loaded into a network. A file without
that line is read only with ``torch.load(weights_only=True)``, which runs no
code, to tell an older checkpoint from some other file in the error.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from typing import Any

import torch

from skt._utils import atomic_write, expand_path
from skt.training._state import TrainingState

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "read_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = 3

_MAGIC = b"skt-checkpoint"
_MAX_HEADER = 256  # bytes of the first line: magic, format, digest name and 64 hex digits


def _digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def _target_generator(state: TrainingState) -> torch.Generator | None:
    """What shuffles and augments the target batches of domain adaptation, if anything."""
    return getattr(state.target_batches, "generator", None)


def _rng_state(state: TrainingState) -> dict:
    rng = {"torch": torch.get_rng_state(), "generator": state.generator.get_state()}
    if _target_generator(state) is not None:
        rng["target"] = _target_generator(state).get_state()
    if state.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(state.device)
    return rng


def save_checkpoint(path: str | os.PathLike, state: TrainingState, **identity: Any) -> None:
    """Write ``state`` and its callbacks' own state to ``path``, atomically and durably.

    ``identity`` (e.g. the fit's ``key`` and ``seeds``) is stored as is. A
    crash mid-write leaves the previous checkpoint intact.
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        **identity,
        "epoch": state.epoch,
        "model": state.model.state_dict(),
        "source_head": None if state.source_head is None else state.source_head.state_dict(),
        "domain_classifier": (None if state.domain_classifier is None
                              else state.domain_classifier.state_dict()),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "rng": _rng_state(state),
        "history": [dict(row) for row in state.history],
        "stopped": state.stopped,
        "callbacks": {key: callback.state_dict()
                      for key, callback in _keyed(state.callbacks).items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getbuffer()
    header = f"{_MAGIC.decode()} {CHECKPOINT_FORMAT} blake2b {_digest(body)}\n".encode()
    atomic_write(expand_path(path), header + body, durable=True)


def read_checkpoint(path: str | os.PathLike) -> dict | None:
    """The checkpoint at ``path``, or None when there is none.

    Raises
    ------
    ValueError
        When the file is not a checkpoint of this version, or its content
        does not match its digest (damaged); nothing is loaded then.
    """
    path = expand_path(path)
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"checkpoint={str(path)!r} exists but cannot be read ({exc}). "
                         "Delete it to start afresh.") from exc
    if not data.startswith(_MAGIC + b" "):
        _refuse_other_file(path, data)
    header, _, body = data.partition(b"\n")
    fields = header[:_MAX_HEADER].decode("ascii", errors="replace").split()
    if len(fields) != 4 or fields[1] != str(CHECKPOINT_FORMAT) or fields[2] != "blake2b":
        raise _not_this_version(path)
    if _digest(body) != fields[3]:
        raise ValueError(
            f"checkpoint={str(path)!r} is damaged: its content does not match the checksum "
            "written with it (a disk or copy error, or an edit). Nothing was loaded from it. "
            "Delete it to start afresh, or choose another path.")
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint={str(path)!r} exists but cannot be read ({exc}). "
                         "Delete it to start afresh.") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise _not_this_version(path)
    return payload


def _refuse_other_file(path: os.PathLike, data: bytes) -> None:
    """Raise for a file without the checkpoint line: an older checkpoint, or something else."""
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint={str(path)!r} exists but cannot be read ({exc}). "
                         "Delete it to start afresh.") from exc
    raise _not_this_version(path)


def _not_this_version(path: os.PathLike) -> ValueError:
    return ValueError(f"checkpoint={str(path)!r} is not a FineTuneClassifier checkpoint of "
                      "this version. Delete it or choose another path.")


def load_checkpoint(state: TrainingState, payload: dict) -> None:
    """Restore ``state`` and its callbacks from a :func:`read_checkpoint` payload."""
    state.model.load_state_dict(payload["model"])
    if state.source_head is not None:
        state.source_head.load_state_dict(payload["source_head"])
    if state.domain_classifier is not None:
        state.domain_classifier.load_state_dict(payload["domain_classifier"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"]["torch"])
    state.generator.set_state(payload["rng"]["generator"])
    if _target_generator(state) is not None:
        _target_generator(state).set_state(payload["rng"]["target"])
    if "cuda" in payload["rng"] and state.device.type == "cuda":
        torch.cuda.set_rng_state(payload["rng"]["cuda"], state.device)
    state.epoch = payload["epoch"]
    state.history = [dict(row) for row in payload["history"]]
    state.stopped = payload["stopped"]
    saved = payload["callbacks"]
    for key, callback in _keyed(state.callbacks).items():
        if key in saved:
            callback.load_state_dict(saved[key])


def _keyed(callbacks: Sequence[Any]) -> dict[str, Any]:
    """Callbacks by class name (``EarlyStopping``, ``EarlyStopping_2``, ...).

    Names rather than positions, so that callbacks without state (a progress
    bar shown or not) do not shift the others.
    """
    keyed: dict[str, Any] = {}
    for callback in callbacks:
        name = type(callback).__name__
        key, count = name, 1
        while key in keyed:
            count += 1
            key = f"{name}_{count}"
        keyed[key] = callback
    return keyed
