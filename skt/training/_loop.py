"""The training loop of :class:`skt.FineTuneClassifier`, one overridable method per step.

:class:`TrainingLoop` is a mixin: the estimator inherits its steps, and a
subclass overrides any one of them::

    init_state            the TrainingState: freeze plan, optimiser, schedule, regulariser
    fit_loop              epochs from state.epoch to max_iter, or until a callback stops it
      begin_epoch         what is frozen this epoch; BatchNorm modes
      make_trunk          the frozen stages to compute once per image and view, if any
      distribute          DistributedDataParallel around the network, with several processes
      train_epoch         one pass over the shuffled training batches
        train_step        zero_grad, infer, get_loss, backward, optimizer and scheduler step
          infer           the network's logits
          get_loss        cross-entropy with class weights, plus the regulariser
          get_adaptation_loss   domain adaptation: alignment of source and target features
      validation_score    accuracy (and loss) on the held-out split (when there is one)
        validation_step   logits in eval mode
      target_entropy      domain adaptation: mean prediction entropy on the target images
      end_epoch           records the epoch in state.history

Around the steps, the callbacks in ``state.callbacks`` are notified of
``on_train_begin``, ``on_epoch_begin``, ``on_batch_end``, ``on_epoch_end``
and ``on_train_end`` (see :mod:`skt.training._callbacks`). Every step
receives the :class:`TrainingState`; hyper-parameters are read from the
estimator (``self``).

With several processes (``state.world > 1``, see :mod:`skt.training._distributed`),
each rank runs the same steps on its piece of every global batch: the
training forward passes go through DistributedDataParallel, the loss is
scaled so that the gradients averaged over the ranks are those of the whole
batch, BatchNorm statistics of layers that normalise with batch statistics
are averaged over the ranks at the end of each epoch, and the training loss
and validation score are summed over the ranks, so that every rank records
the same history and takes the same decisions.

Domain adaptation (``state.target_batches``, see :mod:`skt.training._adaptation`):
each step runs the source batch and the next target batch through the
network as one batch, and adds ``adaptation_strength`` times the alignment
loss between their penultimate features to the source loss. Across
processes each rank aligns its piece of the source batch with its piece of
the target batch: the alignment loss (a CORAL covariance, say) is computed
per piece, and the gradients DDP averages are those of the mean over the
ranks of the per-piece losses.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from skt._utils import memory_format
from skt.images import view_count
from skt.training._adaptation import (
    coral_loss,
    cycle_batches,
    dann_coefficient,
    dann_loss,
    prediction_entropy,
)
from skt.training._distributed import average_batch_statistics, reduce_sum, wrap_network
from skt.training._freeze import FreezePlan, fixed_statistics, make_freeze_plan
from skt.training._optim import make_optimizer, make_scheduler
from skt.training._regularizers import (
    DEFAULT_ALPHA,
    distillation_loss,
    l2sp_penalty,
    record_head_input,
)
from skt.training._state import TrainingState
from skt.training._trunk import Trunk, split_network

__all__ = ["TrainingLoop"]


class TrainingLoop:
    """Training steps of a classifier network, each a method a subclass may override.

    The estimator provides the hyper-parameters the steps read: ``max_iter``,
    ``freeze``, ``unfreeze_schedule``, ``batchnorm``, ``optimizer``,
    ``learning_rate_init``, ``backbone_lr_scale``, ``weight_decay``,
    ``lr_schedule``, ``warmup``, ``regularization``, ``alpha``, ``beta``,
    ``augment`` and ``frozen_cache``; with domain adaptation also
    ``domain_adaptation`` and ``adaptation_strength``.
    """

    def init_state(self, model: nn.Module, head_name: str, pretrained: nn.Module,
                   stages: tuple[tuple[str, ...], ...], *, device: torch.device,
                   generator: torch.Generator, steps_per_epoch: int,
                   class_weight: torch.Tensor | None = None,
                   domain_classifier: nn.Module | None = None) -> TrainingState:
        """The state to train ``model`` (moved to ``device``), whose classifier is ``head_name``.

        ``pretrained`` is the network before fine-tuning: the anchor of L2-SP,
        the teacher of learning without forgetting, and the source of the
        BatchNorm statistics that stay fixed; ``stages`` are its declared
        stages (what ``freeze=<int>`` counts). DANN's ``domain_classifier``
        trains at the head's learning rate.
        """
        freeze = make_freeze_plan(self.freeze, self.unfreeze_schedule, model, head_name, stages)
        model.to(device=device, memory_format=memory_format(device))
        state = TrainingState(model=model, head_name=head_name, optimizer=None, scheduler=None,
                              device=device, generator=generator, freeze=freeze,
                              fixed_statistics=fixed_statistics(pretrained, self.batchnorm),
                              class_weight=class_weight)
        head = list(state.head.parameters())
        if domain_classifier is not None:
            state.domain_classifier = domain_classifier.to(device)
            head += list(domain_classifier.parameters())
        if self.regularization == "lwf":
            state.source = copy.deepcopy(pretrained).eval().requires_grad_(False).to(
                device=device, memory_format=memory_format(device))
            state.source_head = copy.deepcopy(pretrained.get_submodule(head_name)).to(device)
        backbone = list(state.backbone_parameters())
        trained = [p for name, p in backbone if freeze.ever_trained(name, self.max_iter)]
        if state.source_head is not None:
            trained += list(state.source_head.parameters())
        state.optimizer = make_optimizer(
            head, trained, kind=self.optimizer,
            learning_rate=self.learning_rate_init, backbone_lr_scale=self.backbone_lr_scale,
            # the L2-SP penalty replaces weight decay
            weight_decay=0.0 if self.regularization == "l2sp" else self.weight_decay)
        state.scheduler = make_scheduler(state.optimizer, self.max_iter * steps_per_epoch,
                                         schedule=self.lr_schedule, warmup=self.warmup)
        if self.regularization == "l2sp":
            reference = dict(pretrained.named_parameters())
            state.anchor = {name: reference[name].detach().to(device) for name, p in backbone
                            if name in reference and reference[name].shape == p.shape}
        self._plan_trunk(state)
        return state

    def trunk_obstacle(self, freeze: FreezePlan) -> str | None:
        """Why the frozen stages cannot be computed once per image and view; None if they can."""
        if self.frozen_cache is None:
            return "frozen_cache is None"
        if freeze.n_frozen == 0:
            return "no stage is frozen (freeze must be a stage count, 'auto' or 'all')"
        if view_count(self.augment) == 0:
            return f"augment={self.augment!r} draws random crops, not one of a few fixed views"
        if self.regularization == "lwf":
            return "regularization='lwf' runs the original network on the images"
        return None

    def _plan_trunk(self, state: TrainingState) -> None:
        obstacle = self.trunk_obstacle(state.freeze)
        if obstacle is None:
            state.trunk = split_network(state.model, state.freeze.stages, state.freeze.n_frozen)
            if state.trunk is None:
                obstacle = ("the network's graph cannot be cut after its frozen stages (FX "
                            "cannot trace it, or later stages read more than their output)")
        if obstacle is not None and self.frozen_cache in ("memory", "disk"):
            raise ValueError(f"frozen_cache={self.frozen_cache!r} keeps the output of the frozen "
                             f"stages, but {obstacle}. Use frozen_cache='auto' (which then "
                             "runs the whole network every step) or None.")
        state.reuse_trunk = obstacle is None

    def make_trunk(self, state: TrainingState) -> Trunk | None:
        """This epoch's frozen trunk: the same as last epoch's unless a stage thawed."""
        if not state.reuse_trunk:
            return None
        n_frozen = state.freeze.frozen_stages(state.epoch)
        if state.trunk is not None and state.trunk.n_frozen == n_frozen:
            return state.trunk
        return split_network(state.model, state.freeze.stages, n_frozen)

    def notify(self, event: str, state: TrainingState, **kwargs) -> None:
        """Call ``event`` on every callback of ``state``, in order."""
        for callback in state.callbacks:
            getattr(callback, event)(self, state, **kwargs)

    def fit_loop(self, state: TrainingState, train: Iterable, valid: Iterable | None) -> None:
        """Run epochs from ``state.epoch`` up to ``max_iter``, or until ``state.stopped``."""
        state.batches_per_epoch = len(train)
        splits = [batches for batches in (train, valid, state.target_batches, state.target_eval)
                  if batches is not None]
        if not all(hasattr(batches, "use_trunk") for batches in splits):
            state.reuse_trunk, state.trunk = False, None
        remove = (record_head_input(state) if state.source is not None
                  or state.target_batches is not None else None)
        try:
            self.notify("on_train_begin", state)
            while state.epoch < self.max_iter and not state.stopped:
                self.notify("on_epoch_begin", state)
                self.begin_epoch(state)
                state.trunk = self.make_trunk(state)
                for batches in splits if state.reuse_trunk else ():
                    batches.use_trunk(state.trunk, state.device)
                if state.trunk is not None:  # a dropout between frozen stages, say
                    for name in state.trunk.modules:
                        state.model.get_submodule(name).eval()
                self.distribute(state)
                loss = self.train_epoch(state, train)
                if state.world > 1:  # before validation puts the layers in eval mode
                    average_batch_statistics(state.model, state.world)
                score = None if valid is None else self.validation_score(state, valid)
                if state.target_eval is not None:
                    state.metrics["target_entropy"] = self.target_entropy(state,
                                                                          state.target_eval)
                self.end_epoch(state, loss, score)
                self.notify("on_epoch_end", state)
        finally:
            state.ddp = None
            if remove is not None:
                remove()
            for batches in splits if state.reuse_trunk else ():
                batches.close()
        self.notify("on_train_end", state)

    def begin_epoch(self, state: TrainingState) -> None:
        """Apply this epoch's freezing and set each BatchNorm layer's mode.

        Frozen layers, and those in ``state.fixed_statistics``, run in eval
        mode: they normalise with their pretrained running statistics (their
        affine parameters may still train). The others normalise with batch
        statistics and keep as running statistics the plain average over the
        epoch (``momentum=None``, restarted every epoch), which at its end
        describes this data under this epoch's weights. Frozen stages run in
        eval mode as a whole (no dropout or stochastic depth either): each is a
        fixed function of its input, which is what lets :meth:`make_trunk`
        compute them once.
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
        frozen = state.freeze.frozen_prefixes(state.epoch)
        for name, module in state.model.named_modules():  # a prefix may name a parameter
            if any(name == prefix or name.startswith(prefix + ".") for prefix in frozen):
                module.eval()

    def distribute(self, state: TrainingState) -> None:
        """With several processes, wrap the network in DistributedDataParallel for this epoch.

        The wrapper is built in the first epoch and again when the
        parameters that train change (a stage thawed); building it
        broadcasts rank 0's weights. Its forward runs :meth:`Trunk.rest`
        when the epoch has a trunk. One process: nothing to do.
        """
        if state.world > 1:
            state.ddp = wrap_network(state.model, state.source_head, state.device, state.ddp,
                                     domain_classifier=state.domain_classifier)
            state.ddp.module.trunk = state.trunk

    def train_epoch(self, state: TrainingState, batches: Iterable) -> float:
        """One pass over ``batches``; returns the mean training loss.

        With several processes, the mean over the whole epoch's global
        batches, the same on every rank. With domain adaptation, each step
        also draws the next target batch (:func:`~skt.training.cycle_batches`:
        every epoch starts a new pass over the target images, and another
        when one ends), and the epoch's mean alignment loss goes to
        ``state.metrics["adaptation_loss"]``.
        """
        # On the device, so that nothing waits for it until the epoch ends (MPS has no float64).
        total = torch.zeros((), dtype=torch.float32 if state.device.type == "mps"
                            else torch.float64, device=state.device)
        adaptation = torch.zeros_like(total)
        count = steps = 0
        targets = None if state.target_batches is None else cycle_batches(state.target_batches)
        per_epoch = max(state.batches_per_epoch, 1)
        try:
            for step, (images, y) in enumerate(batches):
                state.progress = (state.epoch + step / per_epoch) / self.max_iter
                if targets is None:
                    loss = self.train_step(state, images, y)
                else:
                    loss = self.train_step(state, images, y, next(targets)[0])
                    adaptation += state.adaptation_loss.to(total.dtype)
                # with several processes, the global batch's loss is the mean of the ranks' terms
                total += loss.to(total.dtype) * (len(y) if state.world == 1
                                                 else state.batch_totals[0] / state.world)
                count += len(y)
                steps += 1
                self.notify("on_batch_end", state, loss=loss)
        finally:
            if targets is not None:  # stops the target pass under way, and its threads
                targets.close()
        if targets is not None:
            sums = torch.stack([total, total.new_tensor(count), adaptation,
                                total.new_tensor(steps)])
            total, count, adaptation, steps = (reduce_sum(sums) if state.world > 1
                                               else sums).tolist()
            state.metrics["adaptation_loss"] = adaptation / max(steps, 1)
        elif state.world > 1:
            total, count = reduce_sum(torch.stack([total, total.new_tensor(count)])).tolist()
        return float(total) / max(count, 1)

    def to_device(self, state: TrainingState, images: torch.Tensor, y: torch.Tensor):
        """A batch on the training device, images in its preferred memory format."""
        images = images.to(state.device, non_blocking=True)
        if images.ndim == 4:
            images = images.contiguous(memory_format=state.memory_format)
        return images, y.to(state.device, non_blocking=True)

    def train_step(self, state: TrainingState, images: torch.Tensor, y: torch.Tensor,
                   target: torch.Tensor | None = None) -> torch.Tensor:
        """One optimisation step on a batch; returns the detached loss.

        With several processes, ``images`` and ``y`` are this rank's piece of
        the global batch; the items and class weight of the whole batch are
        summed over the ranks first (``state.batch_totals``, which
        :meth:`get_loss` reads), and the loss returned is this rank's term.

        With domain adaptation, ``target`` is a batch of unlabelled target
        images (or trunk outputs). It runs through the network with the
        source batch, as one batch: one forward pass (which is what
        DistributedDataParallel expects), and layers that normalise with
        batch statistics see both domains, in training as their running
        statistics do in prediction. The loss adds ``adaptation_strength``
        times :meth:`get_adaptation_loss` to :meth:`get_loss`, whose terms
        (cross-entropy, regulariser, and ``state.penultimate`` for
        distillation) see the source part alone.
        """
        n_source = len(y)
        if target is not None:
            images = torch.cat([images, target])
        images, y = self.to_device(state, images, y)
        state.optimizer.zero_grad(set_to_none=True)
        if state.world > 1:
            state.batch_totals = reduce_sum(self._batch_weights(state, y))
        logits = self.infer(state, images)
        if target is None:
            loss = self.get_loss(state, logits, y, images, training=True)
        else:
            features = state.penultimate.flatten(1)
            state.penultimate = state.penultimate[:n_source]
            adaptation = self.get_adaptation_loss(state, features[:n_source],
                                                  features[n_source:])
            loss = (self.get_loss(state, logits[:n_source], y, images[:n_source], training=True)
                    + self.adaptation_strength * adaptation)
            state.adaptation_loss = adaptation.detach()
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        return loss.detach()

    def infer(self, state: TrainingState, images: torch.Tensor) -> torch.Tensor:
        """Logits of the network for a batch already on the device.

        With a trunk (:meth:`make_trunk`), the batch holds the trunk's outputs
        and only the rest of the network runs.
        """
        if state.ddp is not None and torch.is_grad_enabled():  # what DDP reduces
            return state.ddp(images)
        if state.trunk is not None:
            return state.trunk.rest(images, state.model.training)
        return state.model(images)

    @staticmethod
    def _batch_weights(state: TrainingState, y: torch.Tensor) -> torch.Tensor:
        """Items of a batch and the sum of their class weights (float64, on the device)."""
        items = torch.full((), len(y), dtype=torch.float64, device=y.device)
        weight = items if state.class_weight is None else state.class_weight[y].double().sum()
        return torch.stack([items, weight])

    def get_loss(self, state: TrainingState, logits: torch.Tensor, y: torch.Tensor,
                 images: torch.Tensor | None = None, training: bool = False) -> torch.Tensor:
        """Cross-entropy (weighted by class) combined with the regulariser.

        ``"l2sp"`` adds :func:`~skt.training.l2sp_penalty`; ``"lwf"`` returns
        ``alpha * L_source + (1 - alpha) * L_target`` with ``L_source`` the
        :func:`~skt.training.distillation_loss`.

        With several processes (``training`` steps only), the terms that
        depend on the data are multiplied by ``world * local / total``: the
        share of this rank's piece in the global batch's class weight (for
        the cross-entropy) or items (for the per-item distillation), times
        the number of ranks, so that the gradients DDP averages are those of
        the whole batch. The L2-SP penalty does not depend on the data: each
        rank adds all of it, and their average is the penalty.
        """
        loss = F.cross_entropy(logits, y, weight=state.class_weight)
        shares = None
        if training and state.world > 1:
            shares = (state.world * self._batch_weights(state, y) / state.batch_totals).to(
                loss.dtype)
            loss = loss * shares[1]
        if not training or self.regularization == "none":
            return loss
        alpha = DEFAULT_ALPHA[self.regularization] if self.alpha is None else self.alpha
        if self.regularization == "l2sp":
            return loss + l2sp_penalty(state, alpha, self.beta)
        distillation = distillation_loss(state, images)
        if shares is not None:
            distillation = distillation * shares[0]
        return alpha * distillation + (1 - alpha) * loss

    def get_adaptation_loss(self, state: TrainingState, source: torch.Tensor,
                            target: torch.Tensor) -> torch.Tensor:
        """The alignment loss between source and target penultimate features, unweighted.

        ``"coral"``: :func:`~skt.training.coral_loss`. ``"dann"``:
        :func:`~skt.training.dann_loss` through ``state.domain_classifier``,
        the gradient reversal's coefficient ramping with ``state.progress``
        (:func:`~skt.training.dann_coefficient`).
        """
        if self.domain_adaptation == "dann":
            return dann_loss(state.domain_classifier, source, target,
                             dann_coefficient(state.progress))
        return coral_loss(source, target)

    def validation_step(self, state: TrainingState, images: torch.Tensor,
                        y: torch.Tensor) -> torch.Tensor:
        """Logits for a validation batch, in eval mode and without gradients."""
        images, _ = self.to_device(state, images, y)
        with torch.inference_mode():
            return self.infer(state, images)

    def validation_score(self, state: TrainingState, batches: Iterable) -> float:
        """Accuracy on the validation split, as ``score`` would report it.

        The mean cross-entropy (without class weights) goes to
        ``state.metrics["valid_loss"]``. Leaves the network in eval mode; the
        next epoch sets its modes again. With several processes, each rank
        scores its part of the split and the counts and sums are added up:
        every rank returns the score of the whole split.
        """
        state.model.eval()
        correct = torch.zeros((), dtype=torch.long)
        loss = torch.zeros((), dtype=torch.float64)
        count = 0
        for images, y in batches:
            logits = self.validation_step(state, images, y)
            correct += (logits.argmax(1).cpu() == y).sum()
            loss += F.cross_entropy(logits.cpu().double(), y, reduction="sum")
            count += len(y)
        if state.world > 1:
            correct, count, loss = reduce_sum(torch.tensor(
                [int(correct), count, float(loss)], dtype=torch.float64,
                device=state.device)).tolist()
        state.metrics["valid_loss"] = float(loss) / count
        return int(correct) / count

    def target_entropy(self, state: TrainingState, batches: Iterable) -> float:
        """Mean prediction entropy on the target images, in nats (lower: more confident).

        An unsupervised criterion for choosing among epochs without target
        labels (:func:`~skt.training.prediction_entropy`). Eval mode, as
        :meth:`validation_score`; with several processes, the ranks' parts
        are added up.
        """
        state.model.eval()
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        for images, y in batches:
            total += prediction_entropy(self.validation_step(state, images, y).cpu()).sum()
            count += len(y)
        if state.world > 1:
            total, count = reduce_sum(torch.tensor([float(total), count], dtype=torch.float64,
                                                   device=state.device)).tolist()
        return float(total) / count

    def end_epoch(self, state: TrainingState, loss: float, score: float | None) -> None:
        """Record the epoch and ``state.metrics`` in ``state.history``.

        A non-finite loss stops training with advice.
        """
        state.epoch += 1
        state.history.append({"epoch": state.epoch, "train_loss": loss, "valid_score": score,
                              **state.metrics})
        state.metrics = {}
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"The training loss became {loss} in epoch {state.epoch}. Lower "
                "learning_rate_init, or use lr_schedule with a longer warmup.")
