"""The network truncated after the requested layers, with per-layer pooling summaries."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from skt.backbones import PRE_LOGITS, tracer_kwargs
from skt.pooling import (
    TOKEN_POOLINGS,
    LayerLayout,
    OutputFormat,
    output_format,
    summarize,
    summary_kind,
)

__all__ = ["FeatureModel", "build_feature_model", "prefix_tokens", "truncate"]


class _PreLogits(nn.Module):
    """The network with its classifier replaced by the identity."""

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


def _traced(model: nn.Module, return_nodes) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "eval nodes are a subsequence..."
        return create_feature_extractor(model, return_nodes=return_nodes,
                                        tracer_kwargs=tracer_kwargs())


def truncate(model: nn.Module, layers: list[str], classifier: str | None) -> nn.Module:
    """A module mapping images to ``{layer: output}``, cut after the last layer needed.

    ``PRE_LOGITS`` is the input of ``classifier``, the module name of the
    final linear layer. Networks whose classifier is not linear (SqueezeNet)
    use their ``features`` output instead; a user module without a linear
    layer gives its own output. ``model`` is modified in place: pass a copy
    to keep it.
    """
    if layers == [PRE_LOGITS]:
        if classifier is None and hasattr(model, "features"):
            return _traced(model, {"features": PRE_LOGITS})
        return _PreLogits(model, classifier)
    try:
        return _traced(model, list(layers))
    except Exception:  # FX cannot trace data-dependent control flow: read modules by hooks
        modules = dict(model.named_modules())
        if not all(name in modules for name in layers):
            raise
        return _Hooked(model, list(layers))


class FeatureModel(nn.Module):
    """The truncated backbone followed by :func:`skt.pooling.summarize` per layer.

    Returns a tuple with one ``(N, K)`` float32 summary per layer, in order: a
    plain tensor output, so the same module runs eagerly or exported to ONNX.
    ``formats`` gives each layer's :class:`~skt.pooling.OutputFormat`; a layer
    missing from it gets the default of its number of dimensions.
    """

    def __init__(self, body: nn.Module, layers: Sequence[str], pooling: str,
                 formats: dict[str, OutputFormat] | None = None) -> None:
        super().__init__()
        self.body = body
        self.layers = list(layers)
        self.pooling = pooling
        self.formats = dict(formats or {})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.body(x)
        return tuple(summarize(outputs[name], self.pooling, self.formats.get(name))
                     for name in self.layers)


def prefix_tokens(network: nn.Module) -> tuple[int, bool]:
    """How many tokens a vision transformer puts ahead of its patches, and whether the
    first is a class token, as the network declares them.

    timm declares ``num_prefix_tokens`` (class and register tokens) and
    ``cls_token``; torchvision's ViT has a ``class_token`` parameter. Other
    networks have no prefix tokens.
    """
    token = getattr(network, "cls_token", None)
    if token is None:
        token = getattr(network, "class_token", None)
    count = getattr(network, "num_prefix_tokens", None)
    if not isinstance(count, int):
        count = 1 if torch.is_tensor(token) else 0
    return count, torch.is_tensor(token) and count > 0


def build_feature_model(network: nn.Module, classifier: str | None, size: int,
                        layers: list[str], pooling: str,
                        ) -> tuple[FeatureModel, list[LayerLayout]]:
    """Truncate ``network`` after ``layers`` and probe, at ``size`` px, the summaries' layout.

    ``network`` is modified (its classifier may be replaced): pass a copy.
    """
    prefix = prefix_tokens(network)
    model = FeatureModel(truncate(network, layers, classifier), layers, pooling).eval()
    with torch.inference_mode():
        raw = model.body(torch.zeros(2, 3, size, size))
    layout = []
    for name in layers:
        output = raw[name]
        if not torch.is_tensor(output):
            raise TypeError(f"Layer {name!r} returns a {type(output).__name__}, not a tensor; "
                            "pick a layer whose output is one tensor.")
        if output.ndim < 2 or output.shape[0] != 2:
            raise ValueError(
                f"Layer {name!r} gives {tuple(output.shape)} for 2 images: its first axis is "
                "not the images (attention windows or heads share it). Pick the output of a "
                "block or stage; skt.list_layers(backbone) lists the names.")
        form = output_format(tuple(output.shape), *prefix)
        model.formats[name] = form
        kind = summary_kind(form, pooling)
        if pooling in TOKEN_POOLINGS and kind not in ("tokens", "vector"):
            raise ValueError(
                f"pooling={pooling!r} takes the class token, and layer {name!r} "
                f"({tuple(output.shape[1:])} per image) has none. Pick a transformer block "
                "of a model with a class token, or pooling 'avg', 'max', 'gem' or 'avgmax'.")
        layout.append(LayerLayout(name, kind, summarize(output, pooling, form).shape[1]))
    return model, layout
