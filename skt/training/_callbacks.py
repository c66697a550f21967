"""Callbacks: what happens around the training steps, on named events.

A callback is notified on ``on_train_begin``, ``on_epoch_begin``,
``on_batch_end``, ``on_epoch_end`` and ``on_train_end``, with the estimator
and the :class:`~skt.training.TrainingState`. Progress bars, early stopping
and checkpoints are callbacks, so the loop itself never changes to add one:

>>> from skt.training import Callback
>>> class PrintLoss(Callback):
...     def on_epoch_end(self, estimator, state):
...         print(f"epoch {state.epoch}: loss {state.history[-1]['train_loss']:.3f}")

``FineTuneClassifier(callbacks=[PrintLoss()])`` runs it after its own.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm

from skt.training._checkpoint import save_checkpoint
from skt.training._state import TrainingState

__all__ = ["Callback", "Checkpoint", "EarlyStopping", "ProgressBar", "WeightAverage"]


class Callback:
    """Base class: every event does nothing; override the ones you need.

    Keep constructor arguments as attributes of the same name (as
    scikit-learn estimators do): the ``repr`` is built from them, and
    :class:`skt.FineTuneClassifier` uses it to tell one fit's checkpoint from
    another's. A callback with state that must survive a resumed fit returns
    it from :meth:`state_dict` (tensors, numbers, lists and dicts of them).
    """

    def on_train_begin(self, estimator: Any, state: TrainingState) -> None:
        """Before the first epoch (also when resuming from a checkpoint)."""

    def on_epoch_begin(self, estimator: Any, state: TrainingState) -> None:
        """Before an epoch's first batch; ``state.epoch`` epochs are done."""

    def on_batch_end(self, estimator: Any, state: TrainingState, loss: Any) -> None:
        """After each optimisation step; ``loss`` is the batch's detached loss tensor."""

    def on_epoch_end(self, estimator: Any, state: TrainingState) -> None:
        """After an epoch is recorded in ``state.history`` (loss and validation score)."""

    def on_train_end(self, estimator: Any, state: TrainingState) -> None:
        """After the last epoch, when training ended normally."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps of this callback."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        names = [name for name in inspect.signature(type(self).__init__).parameters
                 if name != "self"]
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in names
                         if hasattr(self, name))
        return f"{type(self).__name__}({args})"


class ProgressBar(Callback):
    """Progress per epoch: a tqdm bar on a terminal, one line per epoch elsewhere.

    On a terminal, a bar over the epoch's batches ends with the loss and
    validation score. When the stream is not a terminal (a CI log, ``make
    demo > log``) a bar's carriage-return updates would fill the file, so
    each epoch prints one line instead:
    ``epoch 2/10: loss 0.3127, val_score 0.8600 (41.2 s)``. Domain
    adaptation adds ``adapt_loss`` and, with a validation split,
    ``target_entropy``.

    Parameters
    ----------
    file : file object, optional
        Where progress goes; default ``sys.stderr`` (read when an epoch begins).
    """

    def __init__(self, file: Any = None) -> None:
        self.file = file
        self._bar = None
        self._start = 0.0

    def __deepcopy__(self, memo: dict) -> ProgressBar:
        return type(self)(file=self.file)  # each fit's copy writes to the same stream

    def _stream(self) -> Any:
        return sys.stderr if self.file is None else self.file

    def on_epoch_begin(self, estimator: Any, state: TrainingState) -> None:
        self._close()
        self._start = time.perf_counter()
        stream = self._stream()
        if getattr(stream, "isatty", lambda: False)():
            self._bar = tqdm(total=state.batches_per_epoch, unit="batch", file=stream,
                             desc=f"epoch {state.epoch + 1}/{estimator.max_iter}")

    def on_batch_end(self, estimator: Any, state: TrainingState, loss: Any) -> None:
        if self._bar is not None:
            self._bar.update()

    def on_epoch_end(self, estimator: Any, state: TrainingState) -> None:
        row = state.history[-1]
        shown = {"loss": f"{row['train_loss']:.4f}"}
        if row.get("valid_score") is not None:
            shown["val_score"] = f"{row['valid_score']:.4f}"
        for key, name in (("adaptation_loss", "adapt_loss"), ("target_entropy", "target_entropy")):
            if row.get(key) is not None:  # domain adaptation
                shown[name] = f"{row[key]:.4f}"
        if self._bar is not None:
            self._bar.set_postfix(shown)
            self._close()
            return
        text = ", ".join(f"{key} {value}" for key, value in shown.items())
        print(f"epoch {state.epoch}/{estimator.max_iter}: {text} "
              f"({time.perf_counter() - self._start:.1f} s)", file=self._stream(), flush=True)

    def on_train_end(self, estimator: Any, state: TrainingState) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class EarlyStopping(Callback):
    """Stop when the monitored value has not improved for ``patience`` epochs.

    Reads ``monitor`` from the rows of ``state.history`` (epochs without it
    are ignored). With ``restore_best`` the network ends with the weights
    of its best epoch.

    Parameters
    ----------
    patience : int, default=3
        Epochs without a better value before stopping.
    restore_best : bool, default=True
        Load the best epoch's weights when training ends.
    monitor : str, default="valid_score"
        The history column to watch: ``"valid_score"`` (validation
        accuracy), ``"valid_loss"``, ``"target_entropy"``, or one a callback
        adds.
    lower_is_better : bool, default=False
        True for a loss or an entropy.

    Attributes
    ----------
    best_score : float or None
        Best value so far.
    best_epoch : int or None
        Its epoch, counted from 1.
    """

    def __init__(self, patience: int = 3, restore_best: bool = True,
                 monitor: str = "valid_score", lower_is_better: bool = False) -> None:
        self.patience = patience
        self.restore_best = restore_best
        self.monitor = monitor
        self.lower_is_better = lower_is_better
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self._best_weights: dict | None = None
        self._waited = 0

    def on_train_begin(self, estimator: Any, state: TrainingState) -> None:
        if state.epoch == 0:  # a fresh fit, not one resumed from a checkpoint
            self.load_state_dict({"best_score": None, "best_epoch": None,
                                  "best_weights": None, "waited": 0})

    def on_epoch_end(self, estimator: Any, state: TrainingState) -> None:
        score = state.history[-1].get(self.monitor)
        if score is None:
            return
        if self.best_score is None or (score < self.best_score if self.lower_is_better
                                       else score > self.best_score):
            self.best_score, self.best_epoch, self._waited = score, state.epoch, 0
            self._best_weights = {name: value.detach().cpu().clone()
                                  for name, value in state.model.state_dict().items()}
        else:
            self._waited += 1
            state.stopped = state.stopped or self._waited >= self.patience

    def on_train_end(self, estimator: Any, state: TrainingState) -> None:
        if self.restore_best and self._best_weights is not None:
            state.model.load_state_dict(self._best_weights)
        self._best_weights = None  # no second copy of the network after training

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch,
                "best_weights": self._best_weights, "waited": self._waited}

    def load_state_dict(self, state: dict) -> None:
        self.best_score = state["best_score"]
        self.best_epoch = state["best_epoch"]
        self._best_weights = state["best_weights"]
        self._waited = state["waited"]


class WeightAverage(Callback):
    """End with the mean of the weights after each of the last ``epochs`` epochs (SWA).

    Stochastic weight averaging (Izmailov et al., 2018) over whole epochs:
    the running sum of the network's floating-point parameters and buffers
    at the end of epochs ``max_iter - epochs + 1`` to ``max_iter`` is
    loaded when training ends. BatchNorm statistics that stay fixed (the
    default) need no recomputation; averaged batch statistics are the
    average of the epochs' own averages. Integer buffers keep their last
    value. Training stopped early averages the epochs it reached.

    Parameters
    ----------
    epochs : int, default=3
        How many of the last epochs to average.
    """

    def __init__(self, epochs: int = 3) -> None:
        self.epochs = epochs
        self._sum: dict | None = None
        self._count = 0

    def on_train_begin(self, estimator: Any, state: TrainingState) -> None:
        if state.epoch == 0:
            self.load_state_dict({"sum": None, "count": 0})

    def on_epoch_end(self, estimator: Any, state: TrainingState) -> None:
        if state.epoch <= estimator.max_iter - self.epochs:
            return
        weights = {name: value.detach().double().cpu()
                   for name, value in state.model.state_dict().items()
                   if value.is_floating_point()}
        if self._sum is None:
            self._sum = weights
        else:
            for name, value in weights.items():
                self._sum[name] += value
        self._count += 1

    def on_train_end(self, estimator: Any, state: TrainingState) -> None:
        if self._sum is not None:
            current = state.model.state_dict()
            state.model.load_state_dict(
                {**current, **{name: (total / self._count).to(current[name].dtype)
                               for name, total in self._sum.items()}})
        self._sum = None

    def state_dict(self) -> dict:
        return {"sum": self._sum, "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        self._sum = state["sum"]
        self._count = state["count"]


class Checkpoint(Callback):
    """Write the training state to ``path`` at the end of every epoch.

    The file (see :func:`skt.training.save_checkpoint`) holds the network,
    optimiser, scheduler, history, random-number states and every callback's
    :meth:`~Callback.state_dict`; it is replaced atomically, so a crash never
    leaves a half-written one. ``identity`` is stored with it, so that a
    later fit can tell whether the checkpoint is its own.
    """

    def __init__(self, path: str | os.PathLike, **identity: Any) -> None:
        self.path = path
        self.identity = identity

    def on_epoch_end(self, estimator: Any, state: TrainingState) -> None:
        save_checkpoint(self.path, state, **self.identity)

    def __repr__(self) -> str:
        return f"Checkpoint(path={os.fspath(self.path)!r})"
