"""Networks turned into feature summaries: truncation, engines, device, the extraction path.

:func:`truncate` cuts a network after the requested layers;
:class:`FeatureModel` adds the pooling summaries; an engine
(:class:`TorchEngine`, :class:`OnnxEngine`, chosen by :func:`make_engine`)
runs it on the device :func:`resolve_device` picks; :class:`FeatureRuntime`
and :func:`extract_into` are the path both estimators share.
"""

from skt.extract._device import PRECISIONS, native_bfloat16, resolve_device, resolve_precision
from skt.extract._engines import OnnxEngine, TorchEngine, make_engine, onnx_available
from skt.extract._model import FeatureModel, build_feature_model, truncate
from skt.extract._runtime import FeatureRuntime, extract_into

__all__ = [
    "PRECISIONS",
    "FeatureModel",
    "FeatureRuntime",
    "OnnxEngine",
    "TorchEngine",
    "build_feature_model",
    "extract_into",
    "make_engine",
    "native_bfloat16",
    "onnx_available",
    "resolve_device",
    "resolve_precision",
    "truncate",
]
