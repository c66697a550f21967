"""int8 graphs: ONNX Runtime's static quantisation, calibrated on images ``fit`` receives.

A float32 graph exported by :class:`~skt.extract.OnnxEngine` becomes a QDQ
graph: weights int8 per output channel, activations uint8 with ranges from a
calibration pass (the u8 x s8 products that AVX-512 VNNI and AVX-VNNI
instructions compute natively). :func:`calibrate` measures those ranges and
decides how many of the first convolutions stay float32; :func:`quantize`
rebuilds the same int8 graph from what it returned, so a fitted extractor
pickles its calibration, not its images.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["CALIBRATION_IMAGES", "MIN_COSINE", "calibrate", "calibration_digest",
           "calibration_indices", "check_int8_available", "quantize"]

CALIBRATION_IMAGES = 64
"""At most this many images of ``fit``'s input, evenly spaced, calibrate the ranges."""

MIN_COSINE = 0.99
"""The int8 features' mean cosine to float32's on the calibration images that
:func:`calibrate` aims for, keeping more of the first convolutions in float32."""

FLOAT_HEADS = (0, 1, 3, 5, 8)
"""Numbers of leading convolutions kept float32 that :func:`calibrate` tries, in order."""


def check_int8_available() -> None:
    """Raise ``ImportError`` unless ONNX Runtime can quantise from stored ranges."""
    from onnxruntime.quantization import quantize_static

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise ImportError("precision='int8' needs an ONNX Runtime whose quantize_static "
                          "reads stored calibration ranges: pip install -U onnxruntime.")


def calibration_indices(n_images: int, limit: int | None = None) -> list[int]:
    """``limit`` (default :data:`CALIBRATION_IMAGES`) indices evenly spaced over
    ``range(n_images)``, all of them when there are fewer.

    >>> calibration_indices(10, limit=4)
    [0, 3, 6, 9]
    """
    limit = CALIBRATION_IMAGES if limit is None else limit
    if n_images <= limit:
        return list(range(n_images))
    return np.linspace(0, n_images - 1, limit).round().astype(int).tolist()


def calibration_digest(calibration: dict) -> str:
    """A short hash of a :func:`calibrate` result: what names its graph and features."""
    text = json.dumps(calibration, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def calibrate(graph: bytes, batches: Sequence[np.ndarray], run_float) -> dict:
    """Calibration ranges for ``graph`` and how many leading convolutions stay float32.

    Parameters
    ----------
    graph : bytes
        The float32 ONNX graph (input ``"x"``).
    batches : sequence of ndarray
        Preprocessed float32 ``(N, 3, H, W)`` image batches.
    run_float : callable
        ``run_float(batch)``: the float32 graph's outputs for a batch.

    Returns
    -------
    calibration : dict
        ``"ranges"``: ONNX Runtime's calibration data (MinMax, its JSON form);
        ``"float_convs"``: the first entry of :data:`FLOAT_HEADS` whose int8
        features reach a mean cosine of :data:`MIN_COSINE` to float32's on
        ``batches`` (the last entry when none does); ``"cosine"``: that mean.
    """
    expected = np.concatenate([_rows(run_float(batch)) for batch in batches])
    ranges = None  # measured by the first try, reused by the others
    with _prepared(graph) as prepared:
        for float_convs in FLOAT_HEADS:
            quantized, ranges = _quantize(prepared, float_convs, ranges, batches)
            session = _session(quantized)
            got = np.concatenate([_rows(session.run(None, {"x": batch})) for batch in batches])
            cosine = float(np.mean(_cosines(expected, got)))
            if cosine >= MIN_COSINE:
                break
    return {"ranges": ranges, "float_convs": float_convs, "cosine": round(cosine, 6)}


def quantize(graph: bytes, calibration: dict) -> bytes:
    """The int8 graph of ``graph`` under ``calibration`` (from :func:`calibrate`)."""
    with _prepared(graph) as prepared:
        quantized, _ = _quantize(prepared, calibration["float_convs"], calibration["ranges"],
                                 None)
    return quantized


class _Batches:
    """ONNX Runtime's CalibrationDataReader interface over in-memory batches."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {"x": np.ascontiguousarray(batch, dtype=np.float32)}


@contextlib.contextmanager
def _prepared(graph: bytes):
    """A scratch folder holding ``graph`` made ready for quantising, and its nodes.

    Shape inference and graph clean-up, as ONNX Runtime recommends before
    quantising, done once for every try of :func:`calibrate`. The image size
    is fixed, so ONNX's own inference knows every shape (the symbolic one,
    meant for sequence models, fails on some of these graphs).
    """
    import onnx
    from onnxruntime.quantization import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="skt-int8-") as scratch, _quiet():
        folder = Path(scratch)
        (folder / "float.onnx").write_bytes(graph)
        quant_pre_process(str(folder / "float.onnx"), str(folder / "prepared.onnx"),
                          skip_symbolic_shape=True)
        yield folder, onnx.load(str(folder / "prepared.onnx")).graph.node


def _quantize(prepared: tuple, float_convs: int, ranges: str | None,
              batches: Sequence[np.ndarray] | None) -> tuple[bytes, str]:
    """Quantise a :func:`_prepared` graph with stored ``ranges``, or with ranges measured on
    ``batches`` when None; returns the int8 graph and the ranges."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    folder, nodes = prepared
    cache = folder / "ranges.json"
    if ranges is not None:
        cache.write_text(ranges)
    with _quiet():
        quantize_static(str(folder / "prepared.onnx"), str(folder / "int8.onnx"),
                        None if ranges is not None else _Batches(batches),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=_leading(nodes, float_convs),
                        calibration_cache_path=str(cache))
    return (folder / "int8.onnx").read_bytes(), cache.read_text()


def _leading(nodes, float_convs: int) -> list[str]:
    """Names of the nodes up to and including the ``float_convs``-th convolution."""
    convs = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
    if not float_convs or not convs:
        return []
    last = convs[min(float_convs, len(convs)) - 1]
    return [node.name for node in nodes[:last + 1]]


def _session(graph: bytes):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def _rows(outputs: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([out.reshape(len(out), -1) for out in outputs], axis=1)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-30), 1.0)


@contextlib.contextmanager
def _quiet():
    """Silence the quantiser's advice on the root logger and its progress prints."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
