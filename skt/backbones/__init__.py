"""Backbones: a registry of network families, resolved into a network and how to feed it.

:func:`resolve_backbone` turns ``backbone=`` and ``weights=`` into a
:class:`Backbone`: the network, its preprocessing, its classifier name and its
stages, all declared per family in the registry (:class:`BackboneFamily`):
torchvision's classifiers, EfficientNet-Lite, and any timm model as
``"timm:<name>"`` (with the ``timm`` extra; ``import skt`` never imports timm).
:func:`list_layers` and :func:`check_layers` name intermediate layers.
"""

from skt.backbones._layers import (
    PRE_LOGITS,
    TRACER_KWARGS,
    check_layers,
    layer_names,
    list_layers,
    tracer_kwargs,
)
from skt.backbones._registry import (
    BackboneFamily,
    Layout,
    WeightsNotFoundError,
    family_of,
    list_backbones,
    register_family,
)
from skt.backbones._resolve import (
    Backbone,
    classifier_name,
    list_stages,
    resolve_backbone,
    resolve_preprocessing,
    weights_available_offline,
)
from skt.backbones._shapes import layer_shapes

__all__ = [
    "PRE_LOGITS",
    "TRACER_KWARGS",
    "Backbone",
    "BackboneFamily",
    "Layout",
    "WeightsNotFoundError",
    "check_layers",
    "classifier_name",
    "family_of",
    "layer_names",
    "layer_shapes",
    "list_backbones",
    "list_layers",
    "list_stages",
    "register_family",
    "resolve_backbone",
    "resolve_preprocessing",
    "tracer_kwargs",
    "weights_available_offline",
]
