"""What runs a :class:`~skt.extract.FeatureModel`: eager torch, or ONNX Runtime on the CPU."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from skt._utils import memory_format
from skt.cache import mark_used, seal, unseal, write_cache_file
from skt.extract._model import FeatureModel
from skt.images import torch_threads

__all__ = ["OnnxEngine", "TorchEngine", "make_engine", "onnx_available"]


class TorchEngine:
    """Runs a :class:`FeatureModel` eagerly: eval mode, ``inference_mode``, batches.

    On the CPU the model and inputs are channels-last, which oneDNN convolutions
    run faster. ``precision`` "float16" or "bfloat16" turns on autocast to that
    type (see :func:`~skt.extract.resolve_precision` for where it is native).
    ``threads``: torch intra-op threads for each forward pass; None leaves
    torch's setting.
    """

    name = "torch"

    def __init__(self, model: FeatureModel, device: torch.device, precision: str = "float32",
                 threads: int | None = None) -> None:
        self.threads = threads
        self.device = device
        self.dtype = None if precision == "float32" else getattr(torch, precision)
        self.memory_format = memory_format(device)
        self.model = model.to(device=device, memory_format=self.memory_format).eval()

    def __call__(self, batch: torch.Tensor) -> list[np.ndarray]:
        with torch_threads(self.threads), torch.inference_mode():
            x = batch.to(self.device, non_blocking=True).contiguous(
                memory_format=self.memory_format)
            with torch.autocast(self.device.type, dtype=self.dtype,
                                enabled=self.dtype is not None):
                outputs = self.model(x)
        return [out.float().cpu().numpy() for out in outputs]


class OnnxEngine:
    """Runs a :class:`FeatureModel` exported to ONNX, in ONNX Runtime on the CPU.

    The truncated network and the pooling summaries are exported once per
    configuration (``torch.onnx.export``, dynamo exporter, fixed image size,
    dynamic batch), checked against the eager model, and run with all graph
    optimisations. ONNX Runtime fuses the depthwise convolutions of
    MobileNet/EfficientNet-style networks far better than eager PyTorch.

    Parameters
    ----------
    model : FeatureModel
        In eval mode, on the CPU.
    size : int
        Image size the graph is exported for.
    path : Path, optional
        Where to keep the ``.onnx`` file (a feature cache folder) so that later
        processes skip the export; None keeps it in memory only. The file
        carries a checksum (see :func:`skt.cache.seal`); one that is damaged,
        does not load or fails the check against the eager model is replaced
        by a new export, with a warning naming it. When the folder cannot be
        written the graph stays in memory (see :mod:`skt.cache`).
    threads : int, optional
        ONNX Runtime intra-op threads; default ``torch.get_num_threads()``, so
        ``torch.set_num_threads`` controls both engines.

    Raises
    ------
    RuntimeError
        When the export fails or its outputs differ from the eager model.
    """

    name = "onnx"

    def __init__(self, model: FeatureModel, size: int, path: Path | None = None,
                 threads: int | None = None) -> None:
        self.threads = threads
        if path is not None and self._start_stored(model, size, path):
            return
        graph = _export_onnx(model, size)
        self._start(graph)
        self._check(model, size)  # only a graph that passes is kept
        if path is not None:
            write_cache_file(path, seal(path, graph))

    def _start_stored(self, model: FeatureModel, size: int, path: Path) -> bool:
        """Run the graph kept at ``path``; False when there is none or it is damaged."""
        try:
            graph = unseal(path, path.read_bytes())
        except FileNotFoundError:
            return False
        except OSError as exc:
            graph, reason = None, exc.strerror or str(exc)
        else:
            reason = "truncated, corrupt or moved from another graph's place"
        if graph is not None:
            try:
                self._start(graph)
                self._check(model, size)
                mark_used(path)  # pruning skt's folder removes the least recently used first
                return True
            except Exception as exc:  # ONNX Runtime raises its own types; any failure re-exports
                reason = _first_sentence(exc)
        warnings.warn(f"Discarding the exported ONNX graph {path} ({reason}); exporting it "
                      "again.", RuntimeWarning, stacklevel=4)
        return False

    def _start(self, graph: bytes) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads or torch.get_num_threads()
        # Decoding workers share the cores: spinning threads would steal their time.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(graph, options,
                                                    providers=["CPUExecutionProvider"])

    def __call__(self, batch: torch.Tensor) -> list[np.ndarray]:
        x = np.ascontiguousarray(batch.numpy(), dtype=np.float32)
        return self.session.run(None, {"x": x})

    def _check(self, model: FeatureModel, size: int) -> None:
        probe = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = [out.numpy() for out in model(probe)]
        for want, got in zip(expected, self(probe), strict=True):
            scale = max(1.0, float(np.abs(want).max()))
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3,
                                                          atol=1e-4 * scale):
                raise RuntimeError("the exported graph's outputs differ from the eager model's")


def _first_sentence(exc: Exception) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # the exporter colours its text
    first = re.split(r"(?<=\.)\s|\n", text, maxsplit=1)[0].strip()
    return (first[:200] or type(exc).__name__).rstrip(".")


def _export_onnx(model: FeatureModel, size: int) -> bytes:
    example = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, verbose=False,
                                    input_names=["x"], dynamic_shapes={"x": {0: "batch"}},
                                    external_data=False)
    return program.model_proto.SerializeToString()


def onnx_available() -> bool:
    """Whether ONNX Runtime and the exporter's dependencies import."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def make_engine(model: FeatureModel, engine: str, device: torch.device, size: int,
                precision: str = "float32", onnx_path: Path | None = None,
                threads: int | None = None):
    """The engine for ``engine`` ("auto", "torch" or "onnx") on ``device``.

    "auto" is ONNX Runtime on the CPU when it is installed, torch otherwise
    (CUDA and MPS always use torch). A failed export falls back to torch with
    one warning naming the reason. ``precision`` other than "float32" (as
    :func:`~skt.extract.resolve_precision` settles it) runs in torch, whose
    autocast gives it. ``threads``: the CPU threads of the network; None
    means ``torch.get_num_threads()``.
    """
    if engine == "onnx" and precision != "float32":
        raise ValueError(f"engine='onnx' runs in float32; precision={precision!r} runs in the "
                         "torch engine. Use engine='auto' or 'torch'.")
    if engine == "onnx" and not onnx_available():
        raise ImportError("engine='onnx' needs ONNX Runtime: pip install 'skt[onnx]'.")
    if engine == "onnx" and device.type != "cpu":
        raise ValueError(f"engine='onnx' runs on the CPU only; device is {device}. Use "
                         "engine='auto' or 'torch'.")
    if (engine == "torch" or device.type != "cpu" or precision != "float32"
            or not onnx_available()):
        return TorchEngine(model, device, precision, threads)
    try:
        return OnnxEngine(model, size, onnx_path, threads)
    except Exception as exc:  # the exporter raises many types; any failure means torch
        reason = _first_sentence(exc)
        warnings.warn(f"ONNX export failed ({reason}); using the torch engine.",
                      RuntimeWarning, stacklevel=3)
        return TorchEngine(model, device, precision, threads)
