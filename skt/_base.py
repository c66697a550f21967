"""What skt's estimators share: image-input tags and pickles without runtime state."""

from __future__ import annotations

import os
from numbers import Integral, Real

import torch
from torch import nn
from torchvision.models import WeightsEnum

from skt._sklearn import Interval

BACKBONE_CONSTRAINTS = {
    "backbone": [str, nn.Module],
    "weights": [str, os.PathLike, WeightsEnum, None],
    "image_size": [Interval(Integral, 16, None, closed="left"), None],
    "mean": ["array-like", Interval(Real, 0, 1, closed="both"), None],
    "std": ["array-like", Interval(Real, 0, None, closed="neither"), None],
}
"""Parameters that pick the network and its preprocessing, shared by the estimators."""

RUNTIME_CONSTRAINTS = {
    "device": [str, torch.device],
    "num_workers": [Interval(Integral, 0, None, closed="left"), None],
    "random_state": ["random_state"],
    "verbose": ["verbose"],
}
"""Parameters of where and how verbosely the work runs."""


class ImageEstimatorMixin:
    """Mixin for estimators whose input is images, not a 2-D table.

    Put it first among the bases, so that its tags apply on top of
    scikit-learn's ``TransformerMixin`` / ``ClassifierMixin`` tags.

    Pickles hold the network on the CPU (so one fitted on a GPU loads on a
    machine without it) and none of the per-process engines; when the weights
    can be rebuilt by name (``_rebuildable``), the network is left out too.
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True
        tags.transformer_tags.preserves_dtype = []
        tags.requires_fit = True
        return tags

    def __getstate__(self):
        state = super().__getstate__()
        state["_runtime"] = None
        if state.get("_rebuildable"):
            state["model_"] = None  # rebuilt by name on first use: weights stay out of pickles
        elif state.get("model_") is not None:
            state["model_"] = state["model_"].cpu()
        return state
