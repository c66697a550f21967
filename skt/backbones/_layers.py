"""Intermediate layers by graph node name, and the network truncated after them."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from skt.backbones._resolve import classifier_name, resolve_backbone
from skt.backbones.efficientnet_lite import Conv2dSame

__all__ = ["PRE_LOGITS", "check_layers", "list_layers", "truncate"]

PRE_LOGITS = "pre_logits"
"""Name of the default layer: the input of the final classifier."""

# Modules traced as one node: their insides are not useful layers.
_TRACER_KWARGS = {"leaf_modules": [Conv2dSame]}


def _traceable_names(model: nn.Module) -> list[str] | None:
    """Graph nodes in forward order, each module name right after its last node."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "eval nodes are a subsequence..."
            _, nodes = get_graph_node_names(model.eval(), tracer_kwargs=_TRACER_KWARGS)
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
            close = difflib.get_close_matches(name, valid, n=6, cutoff=0.6)
            hint = f" Close matches: {close}." if close else ""
            raise ValueError(f"Unknown layer {name!r}.{hint} skt.list_layers(backbone) lists "
                             f"all {len(valid)} valid names.")
    return requested


class _PreLogits(nn.Module):
    """The network with its final ``nn.Linear`` replaced by the identity."""

    def __init__(self, model: nn.Module, classifier: str | None) -> None:
        super().__init__()
        if classifier is not None:
            model.set_submodule(classifier, nn.Identity())
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(x)
        return {PRE_LOGITS: out.flatten(1) if out.ndim > 2 and out.shape[2:].numel() == 1 else out}


class _Hooked(nn.Module):
    """Layer outputs read by forward hooks, for modules FX cannot trace."""

    def __init__(self, model: nn.Module, layers: list[str]) -> None:
        super().__init__()
        self.model = model
        self.layers = layers
        self._outputs: dict[str, torch.Tensor] = {}
        for name in layers:
            model.get_submodule(name).register_forward_hook(self._recorder(name))

    def _recorder(self, name: str):
        def hook(module, args, output):
            self._outputs[name] = output
        return hook

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._outputs = {}
        self.model(x)
        outputs, self._outputs = self._outputs, {}
        return {name: outputs[name] for name in self.layers}


def _extractor(model: nn.Module, return_nodes) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "eval nodes are a subsequence..."
        return create_feature_extractor(model, return_nodes=return_nodes,
                                        tracer_kwargs=_TRACER_KWARGS)


def truncate(model: nn.Module, layers: list[str]) -> nn.Module:
    """A module mapping images to ``{layer: output}``, cut after the last layer needed.

    ``PRE_LOGITS`` is the input of the final ``nn.Linear`` (the classifier).
    Networks whose classifier is not linear (SqueezeNet) use their ``features``
    output instead; a user module without a linear layer gives its own output.
    ``model`` is modified in place: pass a copy to keep it.
    """
    if layers == [PRE_LOGITS]:
        classifier = classifier_name(model)
        if classifier is None and hasattr(model, "features"):
            return _extractor(model, {"features": PRE_LOGITS})
        return _PreLogits(model, classifier)
    if layer_names(model)[1]:
        return _extractor(model, list(layers))
    return _Hooked(model, list(layers))
