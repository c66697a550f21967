"""Networks turned into feature summaries: truncation, engines, device, the extraction path.

:func:`truncate` cuts a network after the requested layers;
:class:`FeatureModel` adds the pooling summaries; an engine
(:class:`TorchEngine`, :class:`OnnxEngine`, chosen by :func:`make_engine`)
runs it on the device :func:`resolve_device` picks, in float32, bfloat16
autocast or int8 (:func:`calibrate` and :func:`quantize`); :class:`FeatureRuntime`
and :func:`extract_into` are the path both estimators share.
"""

from skt.extract._device import (
    PRECISIONS,
    machine_key,
    native_bfloat16,
    resolve_device,
    resolve_precision,
)
from skt.extract._engines import (
    OnnxEngine,
    TorchEngine,
    check_engine,
    make_engine,
    measure_engines,
    onnx_available,
)
from skt.extract._model import FeatureModel, build_feature_model, truncate
from skt.extract._quantize import calibrate, calibration_digest, calibration_indices, quantize
from skt.extract._runtime import FeatureRuntime, extract_into, readable_batches

__all__ = [
    "PRECISIONS",
    "FeatureModel",
    "FeatureRuntime",
    "OnnxEngine",
    "TorchEngine",
    "build_feature_model",
    "calibrate",
    "calibration_digest",
    "calibration_indices",
    "check_engine",
    "extract_into",
    "machine_key",
    "make_engine",
    "measure_engines",
    "native_bfloat16",
    "onnx_available",
    "quantize",
    "readable_batches",
    "resolve_device",
    "resolve_precision",
    "truncate",
]
