"""What trains: the freeze plan per epoch, the classifier/backbone split, BatchNorm statistics."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from skt._utils import close_matches

__all__ = ["FreezePlan", "auto_frozen_stages", "backbone_parameters", "fixed_statistics",
           "make_freeze_plan", "matches"]


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def matches(name: str, pattern: str) -> bool:
    """``fnmatch`` of a parameter or module name, or of a module that contains it."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def backbone_parameters(model: nn.Module, head: str) -> Iterator[tuple[str, nn.Parameter]]:
    """Named parameters of ``model`` outside its classifier ``head`` (a module name)."""
    for name, parameter in model.named_parameters():
        if not _inside(name, head):
            yield name, parameter


@dataclass(frozen=True)
class FreezePlan:
    """Which backbone parameters are frozen in each epoch.

    ``stages`` holds the name prefixes of each stage, input side first. The
    first ``n_frozen`` stages are frozen at epoch 0, and with
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

    def frozen_prefixes(self, epoch: int) -> list[str]:
        """Module names of the stages frozen in ``epoch``."""
        return [prefix for stage in self.stages[:self.frozen_stages(epoch)] for prefix in stage]

    def ever_trained(self, name: str, max_epoch: int) -> bool:
        return not self.is_frozen(name, max(0, max_epoch - 1))


def _check_patterns(model: nn.Module, head: str, patterns: Sequence[Any]) -> tuple[str, ...]:
    names = [name for name, _ in backbone_parameters(model, head)]
    modules = [name for name, module in model.named_modules()
               if name and not _inside(name, head) and any(True for _ in module.parameters())]
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"freeze patterns must be strings; got {pattern!r}.")
        if not any(matches(name, pattern) for name in names):
            raise ValueError(
                f"freeze pattern {pattern!r} matches no backbone parameter."
                f"{close_matches(pattern, modules + names, cutoff=0.5)} Patterns "
                "are fnmatch patterns over names from model.named_parameters() (the new "
                "classifier excluded); a module name freezes everything inside it.")
    return tuple(patterns)


def auto_frozen_stages(n_stages: int) -> int:
    """Stages ``freeze="auto"`` freezes: all but the last third, rounded up.

    EfficientNet-Lite0's 9 stages: 6 frozen, blocks 11-15 and the head
    convolution train; ResNet's 5: the stem, ``layer1`` and ``layer2``
    frozen. On ELPV this trained to better accuracy than fine-tuning more
    stages, at a fraction of the cost (README, "Fine-tuning on a CPU").

    Examples
    --------
    >>> from skt.training import auto_frozen_stages
    >>> [auto_frozen_stages(n) for n in (1, 2, 3, 5, 9)]
    [0, 1, 2, 3, 6]
    """
    return n_stages - math.ceil(n_stages / 3)


def make_freeze_plan(freeze: Any, unfreeze_every: int | None, model: nn.Module, head: str,
                     stages: tuple[tuple[str, ...], ...]) -> FreezePlan:
    """The plan for the estimators' ``freeze`` and ``unfreeze_schedule`` parameters.

    ``freeze`` is None, a stage count, ``"all"``, ``"auto"`` (all stages
    but the last third, rounded up: :func:`auto_frozen_stages`), or
    ``fnmatch`` patterns (a string or a list of them); ``stages`` are the
    backbone's declared stages.
    """
    if freeze == "auto":
        freeze = auto_frozen_stages(len(stages))
    if isinstance(freeze, str) and freeze != "all":
        freeze = [freeze]
    if isinstance(freeze, list | tuple):
        if unfreeze_every is not None:
            raise ValueError("unfreeze_schedule unfreezes stages, so freeze must be a stage "
                             f"count or 'all', not the patterns {list(freeze)}.")
        return FreezePlan(patterns=_check_patterns(model, head, freeze))
    n_frozen = len(stages) if freeze == "all" else int(freeze or 0)
    if n_frozen > len(stages):
        raise ValueError(f"freeze={freeze}, but this backbone has {len(stages)} stages: "
                         f"{[' + '.join(s) for s in stages]}. Pass at most {len(stages)}, "
                         "or 'all'.")
    if unfreeze_every is not None and n_frozen == 0:
        raise ValueError(f"unfreeze_schedule={unfreeze_every} has nothing to unfreeze: freeze "
                         f"is {freeze!r}. Set freeze to a stage count or 'all'.")
    return FreezePlan(stages=stages, n_frozen=n_frozen, unfreeze_every=unfreeze_every)


def fixed_statistics(pretrained: nn.Module, mode: str) -> frozenset[str]:
    """BatchNorm layers whose running statistics must not change, for ``batchnorm=mode``.

    ``"fixed"``: all of them; ``"batch"``: none; ``"auto"``: those that came
    with statistics (not the running mean 0 and variance 1 of initialisation).
    """
    if mode == "batch":
        return frozenset()
    fixed = set()
    for name, module in pretrained.named_modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            initial = (bool(torch.all(module.running_mean == 0))
                       and bool(torch.all(module.running_var == 1)))
            if mode == "fixed" or not initial:
                fixed.add(name)
    return frozenset(fixed)
