"""Everything that changes while a network trains, in one object the steps share."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from skt._utils import memory_format
from skt.training._freeze import FreezePlan, backbone_parameters
from skt.training._trunk import Trunk

__all__ = ["TrainingState"]


@dataclass(eq=False)
class TrainingState:
    """Everything that changes while a network trains.

    Attributes
    ----------
    model : nn.Module
        The network.
    head_name : str
        Module name of its classifier (:attr:`head`), one output per class.
    optimizer, scheduler
        The optimiser and its per-step learning-rate schedule.
    device : torch.device
    generator : torch.Generator
        Shuffles the batches and seeds their augmentation.
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
        The head's input in the last forward pass, when something records it.
    domain_classifier : nn.Module or None
        DANN: the domain classifier, trained with the network but not part
        of it (:func:`skt.training.make_domain_classifier`).
    target_batches : iterable or None
        Domain adaptation: batches of unlabelled target images (or of their
        trunk outputs), shuffled; each training step draws the next one, a
        new pass starting when one ends (:func:`skt.training.cycle_batches`).
        Its ``generator`` attribute, if any, is checkpointed.
    target_eval : iterable or None
        Every target image once, in order: scored after each epoch
        (``target_entropy``) when there is a validation split.
    progress : float
        The share of this fit's steps done before the current one, from 0
        to 1 (DANN's gradient-reversal ramp reads it).
    adaptation_loss : Tensor or None
        The last step's alignment loss (detached, unweighted).
    metrics : dict of str to float
        What this epoch measured beyond the training loss and validation
        score (``valid_loss``, ``adaptation_loss``, ``target_entropy``);
        :meth:`~skt.training.TrainingLoop.end_epoch` moves it into the
        epoch's history row.
    epoch : int
        Completed epochs; the next one to run.
    history : list of dict
        One row per completed epoch: ``epoch`` (counted from 1),
        ``train_loss``, ``valid_score`` (None without a validation split),
        what :attr:`metrics` held and anything callbacks add.
    stopped : bool
        Set by a callback (early stopping) to end training after this epoch.
    callbacks : list of Callback
        Notified on each event, in order.
    batches_per_epoch : int
        Optimisation steps in one epoch.
    reuse_trunk : bool
        Whether the frozen stages' output may be computed once per image and
        view (see :func:`skt.training.split_network`).
    trunk : Trunk or None
        This epoch's frozen trunk, when batches hold its outputs: the steps
        then run :meth:`Trunk.rest` instead of the whole network.
    rank, world : int
        This process's rank and the number of processes training together
        (0 and 1 without ``torch.distributed``).
    ddp : DistributedDataParallel or None
        With ``world > 1``, the wrapper whose forward the training steps call
        (:meth:`~skt.training.TrainingLoop.distribute`); None otherwise.
    batch_totals : Tensor or None
        With ``world > 1``, the items of this step's global batch and the
        sum of their class weights, over every rank (float64, on the device).
    """

    model: nn.Module
    head_name: str
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
    domain_classifier: nn.Module | None = None
    target_batches: Any = None
    target_eval: Any = None
    progress: float = 0.0
    adaptation_loss: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False
    callbacks: list[Any] = field(default_factory=list)
    batches_per_epoch: int = 0
    reuse_trunk: bool = False
    trunk: Trunk | None = None
    rank: int = 0
    world: int = 1
    ddp: nn.Module | None = None
    batch_totals: torch.Tensor | None = None

    @property
    def head(self) -> nn.Linear:
        """The classifier being trained."""
        return self.model.get_submodule(self.head_name)

    @property
    def memory_format(self) -> torch.memory_format:
        return memory_format(self.device)

    def backbone_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Named parameters of the network outside its classifier."""
        return backbone_parameters(self.model, self.head_name)
