"""Backbones: resolve a name and weights into an ``nn.Module`` and its preprocessing."""

from skt.backbones._config import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, resolve_preprocessing
from skt.backbones._layers import PRE_LOGITS, check_layers, layer_names, list_layers, truncate
from skt.backbones._resolve import (
    Backbone,
    WeightsNotFoundError,
    classifier_name,
    list_backbones,
    resolve_backbone,
    weights_available_offline,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRE_LOGITS",
    "Backbone",
    "Preprocessing",
    "WeightsNotFoundError",
    "check_layers",
    "classifier_name",
    "layer_names",
    "list_backbones",
    "list_layers",
    "resolve_backbone",
    "resolve_preprocessing",
    "truncate",
    "weights_available_offline",
]
