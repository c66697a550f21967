"""Intermediate layers of a network, by graph node name."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn
from torchvision.models.feature_extraction import get_graph_node_names

from skt._utils import close_matches
from skt.backbones._resolve import resolve_backbone
from skt.backbones.efficientnet_lite import Conv2dSame

__all__ = ["PRE_LOGITS", "TRACER_KWARGS", "check_layers", "layer_names", "list_layers"]

PRE_LOGITS = "pre_logits"
"""Name of the default layer: the input of the final classifier."""

TRACER_KWARGS = {"leaf_modules": [Conv2dSame]}
"""FX tracer settings: modules traced as one node, since their insides are not useful layers."""


def _traceable_names(model: nn.Module) -> list[str] | None:
    """Graph nodes in forward order, each module name right after its last node."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "eval nodes are a subsequence..."
            _, nodes = get_graph_node_names(model.eval(), tracer_kwargs=TRACER_KWARGS)
    except Exception:  # FX cannot trace data-dependent control flow
        return None
    nodes = [name for name in nodes if name != "x"]
    last_node = {}
    for position, name in enumerate(nodes):
        parts = name.split(".")
        for depth in range(1, len(parts)):
            last_node[".".join(parts[:depth])] = position
    after: dict[int, list[str]] = {}
    for module, position in last_node.items():
        if module not in nodes:
            after.setdefault(position, []).append(module)
    ordered = []
    for position, name in enumerate(nodes):
        ordered.append(name)
        ordered.extend(sorted(after.get(position, []), key=len, reverse=True))
    return ordered


def _module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def layer_names(model: nn.Module) -> tuple[list[str], bool]:
    """Valid layer names of ``model`` and whether they are FX graph nodes.

    Graph node names (``torchvision.models.feature_extraction``) cover every
    operation; a module that FX cannot trace falls back to submodule names,
    read with forward hooks.
    """
    names = _traceable_names(model)
    return (names, True) if names is not None else (_module_names(model), False)


def list_layers(backbone: str | nn.Module) -> list[str]:
    """Names accepted by ``layers=`` for ``backbone``, in forward order.

    Examples
    --------
    >>> from skt import list_layers
    >>> [name for name in list_layers("resnet18") if name.startswith("layer")][-3:]
    ['layer4.1.relu_1', 'layer4.1', 'layer4']
    """
    model = resolve_backbone(backbone, weights=None).model
    return layer_names(model)[0]


def check_layers(model: nn.Module, layers: str | Sequence[str] | None,
                 valid: list[str] | None = None) -> list[str]:
    """Normalise ``layers`` to a list and reject unknown names, listing close ones.

    ``valid`` are the model's layer names when already known.
    """
    if layers is None:
        return [PRE_LOGITS]
    requested = [layers] if isinstance(layers, str) else list(layers)
    if not requested:
        raise ValueError("layers is empty; pass None for the penultimate features or layer names.")
    if len(set(requested)) != len(requested):
        raise ValueError(f"layers lists a name twice: {requested}.")
    if PRE_LOGITS in requested and len(requested) > 1:
        raise ValueError(f"{PRE_LOGITS!r} (the default layer) cannot be combined with other "
                         "layers; name the node that feeds the classifier instead.")
    valid = layer_names(model)[0] if valid is None else valid
    for name in requested:
        if name not in valid and name != PRE_LOGITS:
            raise ValueError(f"Unknown layer {name!r}.{close_matches(name, valid)} "
                             f"skt.list_layers(backbone) lists all {len(valid)} valid names.")
    return requested
