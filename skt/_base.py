"""What skt's estimators share: their common parameters, image-input tags, runtime state."""

from __future__ import annotations

import os
from numbers import Integral, Real
from typing import ClassVar

import torch
from torch import nn
from torchvision.models import WeightsEnum

from skt._sklearn import Interval, StrOptions

BACKBONE_CONSTRAINTS = {
    "backbone": [str, nn.Module],
    "weights": [str, os.PathLike, WeightsEnum, None],
    "image_size": [Interval(Integral, 16, None, closed="left"), None],
    "mean": ["array-like", Interval(Real, 0, 1, closed="both"), None],
    "std": ["array-like", Interval(Real, 0, None, closed="neither"), None],
    "crop_mode": [StrOptions({"center", "squash"}), None],
}
"""Parameters that pick the network and its preprocessing, shared by the estimators."""

RUNTIME_CONSTRAINTS = {
    "device": [str, torch.device],
    "num_workers": [Interval(Integral, 0, None, closed="left"), None],
    "n_threads": [Interval(Integral, 1, None, closed="left"), None],
    "random_state": ["random_state"],
    "verbose": ["verbose"],
}
"""Parameters of where and how verbosely the work runs."""


class ImageEstimatorMixin:
    """Mixin for estimators whose input is images, not a 2-D table.

    Put it first among the bases, so that its tags apply on top of
    scikit-learn's ``TransformerMixin`` / ``ClassifierMixin`` tags.

    Each class lists in ``_runtime_attributes`` the state it builds per
    process (engines, device copies of networks, thread pools), as skorch
    lists its device-dependent attributes: pickles hold None in their
    place, so the state is rebuilt on first use on the new machine.
    """

    _runtime_attributes: ClassVar[tuple[str, ...]] = ()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True
        tags.transformer_tags.preserves_dtype = []
        tags.requires_fit = True
        return tags

    def __getstate__(self):
        state = dict(super().__getstate__())  # on Python >= 3.11, the live __dict__ itself
        for name in self._runtime_attributes:
            if name in state:
                state[name] = None
        return state
