"""Optimisers with discriminative learning rates, and per-step learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["WarmupSchedule", "make_optimizer", "make_scheduler"]


def make_optimizer(head: Sequence[nn.Parameter], backbone: Sequence[nn.Parameter], *,
                   kind: str, learning_rate: float, backbone_lr_scale: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (``kind="adamw"``) or Nesterov SGD over four parameter groups.

    Head then backbone, each split into weight matrices and kernels (decayed)
    and biases and norm scales (1-D, not decayed); the backbone's learning
    rate is ``backbone_lr_scale`` times the head's. Empty groups are left out.
    """
    groups = []
    for params, lr in ((head, learning_rate), (backbone, learning_rate * backbone_lr_scale)):
        groups.append({"params": [p for p in params if p.ndim > 1], "lr": lr,
                       "weight_decay": weight_decay})
        groups.append({"params": [p for p in params if p.ndim <= 1], "lr": lr,
                       "weight_decay": 0.0})
    groups = [group for group in groups if group["params"]]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=learning_rate, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=learning_rate)


class WarmupSchedule:
    """Learning-rate factor per optimizer step: linear warm-up, then cosine or constant.

    A class rather than a closure so that schedulers pickle and checkpoint.

    Examples
    --------
    >>> from skt.training import WarmupSchedule
    >>> schedule = WarmupSchedule(total_steps=10, warmup_steps=2, decay="cosine")
    >>> [round(schedule(step), 2) for step in (0, 1, 2, 6, 10)]
    [0.33, 0.67, 1.0, 0.5, 0.0]
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


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, *, schedule: str,
                   warmup: float) -> torch.optim.lr_scheduler.LRScheduler:
    """``"cosine"`` / ``"constant"`` after a linear warm-up, or ``"onecycle"``.

    ``warmup`` is the fraction of ``total_steps`` spent warming up (the
    rising phase of the one-cycle policy).
    """
    warmup_steps = round(warmup * total_steps)
    if schedule == "onecycle":
        # OneCycleLR peaks at step pct_start * total_steps - 1 and divides by that step:
        # peak at step warmup_steps, as WarmupSchedule does, and never at step 0.
        rise = max(warmup_steps, 1)
        cycle = max(total_steps, rise + 1)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=cycle, pct_start=(rise + 1) / cycle)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupSchedule(total_steps, warmup_steps, schedule))
