"""Checkpoint files: a training state written atomically, read back to resume."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from skt._utils import atomic_open
from skt.training._state import TrainingState

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "read_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = 2


def _rng_state(state: TrainingState) -> dict:
    rng = {"torch": torch.get_rng_state(), "generator": state.generator.get_state()}
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
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "rng": _rng_state(state),
        "history": [dict(row) for row in state.history],
        "stopped": state.stopped,
        "callbacks": {key: callback.state_dict()
                      for key, callback in _keyed(state.callbacks).items()},
    }
    with atomic_open(path, durable=True) as handle:
        torch.save(payload, handle)


def read_checkpoint(path: str | os.PathLike) -> dict | None:
    """The checkpoint at ``path``, or None when there is none."""
    if not os.path.isfile(path):
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint={os.fspath(path)!r} exists but cannot be read ({exc}). "
                         "Delete it to start afresh.") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint={os.fspath(path)!r} is not a FineTuneClassifier "
                         "checkpoint of this version. Delete it or choose another path.")
    return payload


def load_checkpoint(state: TrainingState, payload: dict) -> None:
    """Restore ``state`` and its callbacks from a :func:`read_checkpoint` payload."""
    state.model.load_state_dict(payload["model"])
    if state.source_head is not None:
        state.source_head.load_state_dict(payload["source_head"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"]["torch"])
    state.generator.set_state(payload["rng"]["generator"])
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
