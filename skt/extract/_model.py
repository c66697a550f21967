"""The network truncated after the requested layers, with per-layer pooling summaries."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from skt.backbones import PRE_LOGITS, tracer_kwargs
from skt.pooling import LayerLayout, summarize, summary_kind

__all__ = ["FeatureModel", "build_feature_model", "truncate"]


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
    """

    def __init__(self, body: nn.Module, layers: Sequence[str], pooling: str) -> None:
        super().__init__()
        self.body = body
        self.layers = list(layers)
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.body(x)
        return tuple(summarize(outputs[name], self.pooling) for name in self.layers)


def build_feature_model(network: nn.Module, classifier: str | None, size: int,
                        layers: list[str], pooling: str,
                        ) -> tuple[FeatureModel, list[LayerLayout]]:
    """Truncate ``network`` after ``layers`` and probe, at ``size`` px, the summaries' layout.

    ``network`` is modified (its classifier may be replaced): pass a copy.
    """
    model = FeatureModel(truncate(network, layers, classifier), layers, pooling).eval()
    with torch.inference_mode():
        raw = model.body(torch.zeros(1, 3, size, size))
    layout = []
    for name in layers:
        output = raw[name]
        if not torch.is_tensor(output):
            raise TypeError(f"Layer {name!r} returns a {type(output).__name__}, not a tensor; "
                            "pick a layer whose output is one tensor.")
        kind = summary_kind(output.ndim, pooling)
        layout.append(LayerLayout(name, kind, summarize(output, pooling).shape[1]))
    return model, layout
