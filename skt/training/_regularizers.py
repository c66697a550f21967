"""Regularisers toward the source task: L2-SP and learning without forgetting."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_ALPHA", "LWF_TEMPERATURE", "distillation_loss", "l2sp_penalty",
           "record_head_input"]

DEFAULT_ALPHA = {"l2sp": 0.01, "lwf": 0.5}
"""Strength of each regulariser when the estimator's ``alpha`` is None."""
LWF_TEMPERATURE = 2.0
"""Li & Hoiem (2016) distil the source outputs at temperature 2."""


def l2sp_penalty(state, alpha: float, beta: float) -> torch.Tensor:
    """L2-SP (Li et al., 2018): ``alpha / 2 ||w - w_pretrained||^2 + beta / 2 ||W_head||^2``.

    The first sum runs over the backbone parameters that train now and have
    a pretrained value in ``state.anchor``.
    """
    drift = [parameter - state.anchor[name] for name, parameter in state.backbone_parameters()
             if parameter.requires_grad and name in state.anchor]
    backbone = sum((d.pow(2).sum() for d in drift), torch.zeros((), device=state.device))
    return alpha / 2 * backbone + beta / 2 * state.head.weight.pow(2).sum()


def record_head_input(state) -> Callable[[], None]:
    """Keep the classifier's input of each forward pass in ``state.penultimate``.

    Returns the function that stops recording.
    """
    def record(module, args):
        state.penultimate = args[0]

    return state.head.register_forward_pre_hook(record).remove


def distillation_loss(state, images: torch.Tensor,
                      temperature: float = LWF_TEMPERATURE) -> torch.Tensor:
    """Learning without forgetting (Li & Hoiem, 2016): distillation on the source task.

    The original network's outputs on the same images (``state.source``) are
    the targets of the source head (``state.source_head``), which reads the
    fine-tuned penultimate features of the last forward pass (see
    :func:`record_head_input`); both are softened at ``temperature``.
    """
    with torch.no_grad():
        target = F.softmax(state.source(images) / temperature, dim=1)
    log_prob = F.log_softmax(state.source_head(state.penultimate) / temperature, dim=1)
    return F.kl_div(log_prob, target, reduction="batchmean")
