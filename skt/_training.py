"""The training loop of :class:`skt.FineTuneClassifier`, one overridable method per step.

:class:`TrainingLoop` is a mixin: the estimator inherits its steps, and a
subclass overrides any one of them::

    fit_loop              epochs from state.epoch to max_iter, or until early stopping
      on_epoch_begin      what is frozen this epoch; BatchNorm modes
      train_epoch         one pass over the shuffled training batches
        train_step        zero_grad, infer, get_loss, backward, optimizer and scheduler step
          infer           the network's logits
          get_loss        cross-entropy with class weights, plus the regulariser
      validation_score    accuracy on the held-out split (early stopping only)
        validation_step   logits in eval mode
      on_epoch_end        records the epoch, keeps the best weights, saves a checkpoint

Every step receives the :class:`TrainingState`: the network, the optimiser
and everything else that changes while training. Hyper-parameters are read
from the estimator (``self``).
"""

from __future__ import annotations

import copy
import fnmatch
import math
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from skt.backbones import Preprocessing
from skt.extract import iter_batches
from skt.images import ImageDataset, collate

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEFAULT_ALPHA",
    "FreezePlan",
    "ImageBatches",
    "TrainingLoop",
    "TrainingState",
    "WarmupSchedule",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = 1
DEFAULT_ALPHA = {"l2sp": 0.01, "lwf": 0.5}
"""Strength of each regulariser when the estimator's ``alpha`` is None."""
LWF_TEMPERATURE = 2.0  # Li & Hoiem (2016) distil the source outputs at T = 2.
# Preprocessed training or validation images are kept in memory, instead of
# being preprocessed again every epoch, while they fit in this many bytes.
CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class FreezePlan:
    """Which backbone parameters are frozen in each epoch.

    ``stages`` holds the module-name prefixes of each stage, input side
    first. The first ``n_frozen`` stages are frozen at epoch 0, and with
    ``unfreeze_every`` one more of them, the one nearest the head, thaws every
    ``unfreeze_every`` epochs. ``patterns`` freeze by ``fnmatch`` pattern
    for the whole fit; a pattern also matches everything inside a module
    it names (``"layer1"`` freezes ``"layer1.0.conv1.weight"``).
    """

    stages: tuple[tuple[str, ...], ...] = ()
    n_frozen: int = 0
    unfreeze_every: int | None = None
    patterns: tuple[str, ...] = ()

    def frozen_stages(self, epoch: int) -> int:
        if self.unfreeze_every is None:
            return self.n_frozen
        return max(0, self.n_frozen - epoch // self.unfreeze_every)

    def is_frozen(self, name: str, epoch: int) -> bool:
        if any(matches(name, pattern) for pattern in self.patterns):
            return True
        return any(_inside(name, prefix) for stage in self.stages[:self.frozen_stages(epoch)]
                   for prefix in stage)

    def ever_trained(self, name: str, max_epoch: int) -> bool:
        return not self.is_frozen(name, max(0, max_epoch - 1))


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def matches(name: str, pattern: str) -> bool:
    """``fnmatch`` of a parameter or module name, or of a module that contains it."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


class WarmupSchedule:
    """Learning-rate factor per optimizer step: linear warm-up, then cosine or constant.

    A class rather than a closure so that schedulers pickle and checkpoint.
    """

    def __init__(self, total_steps: int, warmup_steps: int, decay: str) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.decay = decay

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.decay == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class ImageBatches:
    """``(images, labels)`` batches of a training or validation split.

    Without augmentation the preprocessed images do not change between
    epochs: they are computed once and kept (while they fit in
    :data:`CACHE_BYTES`), so an epoch costs no decoding or resizing. With
    augmentation each epoch goes through :class:`skt.images.ImageDataset`.
    Shuffled batches draw their order (and DataLoader worker seeds) from
    ``generator``; a final batch of one image is left out of a shuffled
    epoch, since BatchNorm cannot train on it.
    """

    def __init__(self, images: Sequence, y: np.ndarray, indices: Sequence[int],
                 config: Preprocessing, batch_size: int, *, augment: str | None = None,
                 shuffle: bool = False, num_workers: int = 0,
                 generator: torch.Generator | None = None) -> None:
        self.images = images
        self.indices = list(indices)
        self.labels = torch.as_tensor(np.asarray(y)[self.indices], dtype=torch.long)
        self.config = config
        self.batch_size = batch_size
        self.augment = augment
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.generator = generator
        self._cached: torch.Tensor | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(len(self.indices), self.batch_size)
        return full + (rest > 1 or (rest == 1 and not self.shuffle))

    def _cache(self) -> torch.Tensor | None:
        size = self.config.crop_size
        if self.augment is not None or len(self.indices) * 3 * size * size * 4 > CACHE_BYTES:
            return None
        if self._cached is None:
            self._cached = torch.cat(list(iter_batches(
                self.images, self.config, self.batch_size, self.num_workers, self.indices)))
        return self._cached

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.indices)
        order = (torch.randperm(n, generator=self.generator) if self.shuffle
                 else torch.arange(n))
        order = order[:len(self) * self.batch_size]
        cached = self._cache()
        if cached is not None:
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                yield cached[rows], self.labels[rows]
            return
        dataset = ImageDataset(self.images, self.config, self.indices, self.augment)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.batch_size, sampler=order.tolist(),
            num_workers=self.num_workers, collate_fn=collate, generator=self.generator,
            prefetch_factor=4 if self.num_workers else None,
        )
        for start, images in zip(range(0, len(order), self.batch_size), loader, strict=True):
            yield images, self.labels[order[start:start + self.batch_size]]


@dataclass(eq=False)
class TrainingState:
    """Everything that changes while a network trains.

    Attributes
    ----------
    model : nn.Module
        The network; its final ``nn.Linear`` is ``head``.
    head : nn.Linear
        The new classifier, one output per class.
    optimizer, scheduler
        The optimiser and its per-step learning-rate schedule.
    device : torch.device
    generator : torch.Generator
        Shuffles the batches.
    freeze : FreezePlan
    fixed_statistics : frozenset of str
        BatchNorm layers that keep their running statistics, even while they train.
    class_weight : Tensor or None
        Cross-entropy weight of each class.
    anchor : dict of str to Tensor
        L2-SP: the pretrained value of every backbone parameter that trains.
    source, source_head : nn.Module or None
        Learning without forgetting: the original network (frozen, eval mode)
        and a copy of its classifier, trained on the penultimate features.
    penultimate : Tensor or None
        The head's input in the last forward pass.
    epoch : int
        Completed epochs; the next one to run.
    """

    model: nn.Module
    head: nn.Linear
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    generator: torch.Generator
    freeze: FreezePlan = field(default_factory=FreezePlan)
    fixed_statistics: frozenset[str] = frozenset()
    class_weight: torch.Tensor | None = None
    anchor: dict[str, torch.Tensor] = field(default_factory=dict)
    source: nn.Module | None = None
    source_head: nn.Linear | None = None
    penultimate: torch.Tensor | None = None
    epoch: int = 0
    loss_curve: list[float] = field(default_factory=list)
    validation_scores: list[float] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    no_improvement: int = 0
    stopped: bool = False
    checkpoint: dict | None = None  # identifies the fit: {"path", "key", "seeds"}

    @property
    def memory_format(self) -> torch.memory_format:
        # oneDNN convolutions run faster channels-last on the CPU.
        return torch.channels_last if self.device.type == "cpu" else torch.contiguous_format

    def backbone_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        head = {id(p) for p in self.head.parameters()}
        for name, parameter in self.model.named_parameters():
            if id(parameter) not in head:
                yield name, parameter


class TrainingLoop:
    """Training steps of a classifier network, each a method a subclass may override.

    The estimator provides the hyper-parameters the steps read: ``max_iter``,
    ``n_iter_no_change``, ``regularization``, ``alpha``, ``beta`` and ``verbose``.
    """

    def fit_loop(self, state: TrainingState, train: Iterable, valid: Iterable | None) -> None:
        """Run epochs from ``state.epoch`` up to ``max_iter``, or until early stopping."""
        remove = self.head_input_hook(state)
        try:
            while state.epoch < self.max_iter and not state.stopped:
                with tqdm(total=len(train), disable=not self.verbose, unit="batch",
                          desc=f"epoch {state.epoch + 1}/{self.max_iter}") as progress:
                    self.on_epoch_begin(state)
                    loss = self.train_epoch(state, train, progress)
                    score = None if valid is None else self.validation_score(state, valid)
                    progress.set_postfix(loss=f"{loss:.4f}", **(
                        {} if score is None else {"val_score": f"{score:.4f}"}))
                self.on_epoch_end(state, loss, score)
        finally:
            remove()

    def head_input_hook(self, state: TrainingState):
        """Record the head's input as ``state.penultimate``; returns the remover."""
        def record(module, args):
            state.penultimate = args[0]
        return state.head.register_forward_pre_hook(record).remove

    def on_epoch_begin(self, state: TrainingState) -> None:
        """Apply this epoch's freezing and set each BatchNorm layer's mode.

        Frozen layers, and those in ``state.fixed_statistics``, run in eval
        mode: they normalise with their pretrained running statistics (their
        affine parameters may still train). The others normalise with batch
        statistics and keep as running statistics the plain average over the
        epoch (``momentum=None``, restarted every epoch), which at its end
        describes this data under this epoch's weights.
        """
        for name, parameter in state.backbone_parameters():
            parameter.requires_grad_(not state.freeze.is_frozen(name, state.epoch))
        state.model.train()
        for name, module in state.model.named_modules():
            if not isinstance(module, _BatchNorm):
                continue
            own = list(module.parameters(recurse=False))
            frozen = (not any(p.requires_grad for p in own) if own
                      else state.freeze.is_frozen(name, state.epoch))
            if frozen or name in state.fixed_statistics:
                module.eval()
            elif module.track_running_stats:
                module.momentum = None
                module.reset_running_stats()

    def train_epoch(self, state: TrainingState, batches: Iterable, progress=None) -> float:
        """One pass over ``batches``; returns the mean training loss."""
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        for images, y in batches:
            loss = self.train_step(state, images, y)
            total += loss.double() * len(y)  # no sync with the device until the epoch ends
            count += len(y)
            if progress is not None:
                progress.update()
        return float(total) / max(count, 1)

    def to_device(self, state: TrainingState, images: torch.Tensor, y: torch.Tensor):
        images = images.to(state.device, non_blocking=True).contiguous(
            memory_format=state.memory_format)
        return images, y.to(state.device, non_blocking=True)

    def train_step(self, state: TrainingState, images: torch.Tensor,
                   y: torch.Tensor) -> torch.Tensor:
        """One optimisation step on a batch; returns the detached loss."""
        images, y = self.to_device(state, images, y)
        state.optimizer.zero_grad(set_to_none=True)
        logits = self.infer(state, images)
        loss = self.get_loss(state, logits, y, images, training=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        return loss.detach()

    def infer(self, state: TrainingState, images: torch.Tensor) -> torch.Tensor:
        """Logits of the network for a batch already on the device."""
        return state.model(images)

    def get_loss(self, state: TrainingState, logits: torch.Tensor, y: torch.Tensor,
                 images: torch.Tensor | None = None, training: bool = False) -> torch.Tensor:
        """Cross-entropy (weighted by class) combined with the regulariser.

        ``"l2sp"`` adds ``alpha / 2 * ||w - w_pretrained||^2`` over the backbone
        and ``beta / 2 * ||W_head||^2``; ``"lwf"`` returns
        ``alpha * L_source + (1 - alpha) * L_target``.
        """
        loss = F.cross_entropy(logits, y, weight=state.class_weight)
        if not training or self.regularization == "none":
            return loss
        alpha = DEFAULT_ALPHA[self.regularization] if self.alpha is None else self.alpha
        if self.regularization == "l2sp":
            return loss + self.l2sp_penalty(state, alpha, self.beta)
        return alpha * self.source_loss(state, images) + (1 - alpha) * loss

    def l2sp_penalty(self, state: TrainingState, alpha: float, beta: float) -> torch.Tensor:
        """L2-SP (Li et al., 2018): distance to the pretrained weights, decay of the head."""
        drift = [parameter - state.anchor[name] for name, parameter in state.backbone_parameters()
                 if parameter.requires_grad and name in state.anchor]
        backbone = sum((d.pow(2).sum() for d in drift), torch.zeros((), device=state.device))
        return alpha / 2 * backbone + beta / 2 * state.head.weight.pow(2).sum()

    def source_loss(self, state: TrainingState, images: torch.Tensor) -> torch.Tensor:
        """Learning without forgetting (Li & Hoiem, 2016): distillation on the source task.

        The original network's outputs on the same images are the targets of
        the source head, which reads the fine-tuned penultimate features;
        both are softened at temperature 2.
        """
        with torch.no_grad():
            target = F.softmax(state.source(images) / LWF_TEMPERATURE, dim=1)
        log_prob = F.log_softmax(state.source_head(state.penultimate) / LWF_TEMPERATURE, dim=1)
        return F.kl_div(log_prob, target, reduction="batchmean")

    def validation_step(self, state: TrainingState, images: torch.Tensor,
                        y: torch.Tensor) -> torch.Tensor:
        """Logits for a validation batch, in eval mode and without gradients."""
        images, _ = self.to_device(state, images, y)
        with torch.inference_mode():
            return self.infer(state, images)

    def validation_score(self, state: TrainingState, batches: Iterable) -> float:
        """Accuracy on the validation split, as ``score`` would report it.

        Leaves the network in eval mode; the next epoch sets its modes again.
        """
        state.model.eval()
        correct = torch.zeros((), dtype=torch.long)
        count = 0
        for images, y in batches:
            logits = self.validation_step(state, images, y)
            correct += (logits.argmax(1).cpu() == y).sum()
            count += len(y)
        return int(correct) / count

    def on_epoch_end(self, state: TrainingState, loss: float, score: float | None) -> None:
        """Record the epoch, track the best validation score, write the checkpoint."""
        state.epoch += 1
        state.loss_curve.append(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"The training loss became {loss} in epoch {state.epoch}. Lower "
                "learning_rate_init, or use lr_schedule with a longer warmup.")
        if score is not None:
            state.validation_scores.append(score)
            if state.best_score is None or score > state.best_score:
                state.best_score, state.best_epoch, state.no_improvement = score, state.epoch, 0
                state.best_weights = copy_weights(state.model)
            else:
                state.no_improvement += 1
                state.stopped = state.no_improvement >= self.n_iter_no_change
        if state.checkpoint is not None:
            save_checkpoint(state)


def _rng_state(state: TrainingState) -> dict:
    rng = {"torch": torch.get_rng_state(), "generator": state.generator.get_state()}
    if state.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(state.device)
    return rng


def save_checkpoint(state: TrainingState) -> None:
    """Write ``state`` to ``state.checkpoint["path"]``: a temporary file, then a rename.

    A crash mid-write leaves the previous checkpoint intact.
    """
    path = os.fspath(state.checkpoint["path"])
    payload = {
        "format": CHECKPOINT_FORMAT,
        "key": state.checkpoint["key"],
        "seeds": state.checkpoint["seeds"],
        "epoch": state.epoch,
        "model": state.model.state_dict(),
        "source_head": None if state.source_head is None else state.source_head.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "rng": _rng_state(state),
        "loss_curve": list(state.loss_curve),
        "validation_scores": list(state.validation_scores),
        "best_score": state.best_score,
        "best_epoch": state.best_epoch,
        "best_weights": state.best_weights,
        "no_improvement": state.no_improvement,
        "stopped": state.stopped,
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


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
    """Restore ``state`` from a :func:`read_checkpoint` payload."""
    state.model.load_state_dict(payload["model"])
    if state.source_head is not None:
        state.source_head.load_state_dict(payload["source_head"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"]["torch"])
    state.generator.set_state(payload["rng"]["generator"])
    if "cuda" in payload["rng"] and state.device.type == "cuda":
        torch.cuda.set_rng_state(payload["rng"]["cuda"], state.device)
    for name in ("epoch", "best_score", "best_epoch", "best_weights", "no_improvement",
                 "stopped"):
        setattr(state, name, payload[name])
    state.loss_curve = list(payload["loss_curve"])
    state.validation_scores = list(payload["validation_scores"])


def copy_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of every parameter and buffer."""
    return {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` whose parameters never train."""
    twin = copy.deepcopy(model).eval()
    for parameter in twin.parameters():
        parameter.requires_grad_(False)
    return twin
