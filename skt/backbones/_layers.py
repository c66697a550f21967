"""Intermediate layers of a network, by graph node name."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn
from torchvision.models.feature_extraction import get_graph_node_names

from skt._utils import close_matches
from skt.backbones._resolve import resolve_backbone
from skt.backbones.efficientnet_lite import Conv2dSame

__all__ = ["PRE_LOGITS", "TRACER_KWARGS", "check_layers", "layer_names", "list_layers",
           "tracer_kwargs"]

PRE_LOGITS = "pre_logits"
"""Name of the default layer: the input of the final classifier."""

TRACER_KWARGS: dict[str, Any] = {"leaf_modules": [Conv2dSame]}
"""FX tracer settings: modules traced as one node, since their insides are not useful layers.

Once timm is imported, :func:`tracer_kwargs` adds timm's own settings here.
"""


def _add(key: str, values: list) -> None:
    known = TRACER_KWARGS.setdefault(key, [])
    known.extend(value for value in values if value not in known)


def tracer_kwargs() -> dict[str, Any]:
    """FX tracer settings for skt's layers and, once timm is imported, timm's.

    timm declares the modules and functions FX must not trace into (its
    ``register_notrace_module`` and ``register_notrace_function``: window
    attention, position-embedding resampling, ...), without which many timm
    models do not trace. They are added to :data:`TRACER_KWARGS` in place, so
    that code reading it after this call sees them too; the dict returned is a
    copy (torchvision's feature extraction sets its defaults in the dict it is given).
    """
    timm_layers = sys.modules.get("timm.layers")
    if timm_layers is not None:
        _add("leaf_modules", timm_layers.get_notrace_modules())
        _add("autowrap_functions", timm_layers.get_notrace_functions())
    return dict(TRACER_KWARGS)


def _traceable_names(model: nn.Module) -> list[str] | None:
    """Graph nodes in forward order, each module name right after its last node."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "eval nodes are a subsequence..."
            _, nodes = get_graph_node_names(model.eval(), tracer_kwargs=tracer_kwargs())
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

    Graph node names (``torchvision.models.feature_extraction``, traced with
    :func:`tracer_kwargs`) cover every operation; a module that FX cannot
    trace falls back to submodule names, read with forward hooks.
    """
    names = _traceable_names(model)
    return (names, True) if names is not None else (_module_names(model), False)


def list_layers(backbone: str | nn.Module) -> list[str]:
    """Names accepted by ``layers=`` for ``backbone``, in forward order.

    For ``"timm:<name>"`` backbones the FX trace uses timm's settings (see
    :func:`tracer_kwargs`), so node names cover timm's transformers too.

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
