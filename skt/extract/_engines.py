"""What runs a :class:`~skt.extract.FeatureModel`: eager torch, or ONNX Runtime on the CPU."""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from skt._utils import memory_format
from skt.cache import mark_used, seal, unseal, write_cache_file
from skt.extract._device import machine_key
from skt.extract._model import FeatureModel
from skt.extract._quantize import check_int8_available, quantize
from skt.images import torch_threads

__all__ = ["OnnxEngine", "TorchEngine", "check_engine", "make_engine", "measure_engines",
           "onnx_available"]

MEASURED_BATCH = 16
"""Images per timed batch when ``engine="auto"`` measures the engines."""


class TorchEngine:
    """Runs a :class:`FeatureModel` eagerly: eval mode, ``inference_mode``, batches.

    On the CPU the model and inputs are channels-last, which oneDNN convolutions
    run faster. ``precision`` "float16" or "bfloat16" turns on autocast to that
    type (see :func:`~skt.extract.resolve_precision` for where it is native).
    ``threads``: torch intra-op threads for each forward pass; None leaves
    torch's setting.
    """

    name = "torch"
    rates: dict[str, float] | None = None  # what engine="auto" measured, when it chose

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
    calibration : dict, optional
        Run the int8 graph :func:`~skt.extract.quantize` makes of the float32
        one under this calibration (from :func:`~skt.extract.calibrate`);
        ``path`` then keeps the int8 graph and ``float_path`` the float32 one.
        An int8 graph is checked for the shapes of its outputs only.
    reuse : sequence of (Path, list of int)
        Stored graphs that compute these outputs among others, with the
        positions of ours among theirs: when there is no graph at ``path``,
        the first that loads and passes the check runs instead of a new
        export (a damaged one is passed over in silence).

    Attributes
    ----------
    graph : bytes
        The ONNX graph that runs.

    Raises
    ------
    RuntimeError
        When the export fails or its outputs differ from the eager model.
    """

    name = "onnx"
    rates: dict[str, float] | None = None  # what engine="auto" measured, when it chose

    def __init__(self, model: FeatureModel, size: int, path: Path | None = None,
                 threads: int | None = None, *, calibration: dict | None = None,
                 float_path: Path | None = None,
                 reuse: Sequence[tuple[Path, list[int]]] = ()) -> None:
        self.threads = threads
        self.calibration = calibration
        if path is not None and self._start_stored(model, size, path):
            return
        for other, outputs in reuse:
            if self._start_stored(model, size, other, outputs):
                return
        if calibration is None:
            graph = _export_onnx(model, size)
        else:
            graph = quantize(OnnxEngine(model, size, float_path, threads).graph, calibration)
        self._start(graph)
        self._check(model, size)  # only a graph that passes is kept
        if path is not None:
            write_cache_file(path, seal(path, graph))

    def _start_stored(self, model: FeatureModel, size: int, path: Path,
                      outputs: list[int] | None = None) -> bool:
        """Run the graph kept at ``path`` (its ``outputs`` only, when given); False when there
        is none or it is damaged, with a warning unless it was another's graph to reuse."""
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
                self._start(graph, outputs)
                self._check(model, size)
                mark_used(path)  # pruning skt's folder removes the least recently used first
                return True
            except Exception as exc:  # ONNX Runtime raises its own types; any failure re-exports
                reason = _first_sentence(exc)
        if outputs is None:
            warnings.warn(f"Discarding the exported ONNX graph {path} ({reason}); exporting "
                          "it again.", RuntimeWarning, stacklevel=4)
        return False

    def _start(self, graph: bytes, outputs: list[int] | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads or torch.get_num_threads()
        # Decoding workers share the cores: spinning threads would steal their time.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(graph, options,
                                                    providers=["CPUExecutionProvider"])
        self.graph = graph
        names = [out.name for out in self.session.get_outputs()]
        self.outputs = None if outputs is None else [names[i] for i in outputs]

    def __call__(self, batch: torch.Tensor) -> list[np.ndarray]:
        x = np.ascontiguousarray(batch.numpy(), dtype=np.float32)
        return self.session.run(self.outputs, {"x": x})

    def _check(self, model: FeatureModel, size: int) -> None:
        probe = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = [out.numpy() for out in model(probe)]
        for want, got in zip(expected, self(probe), strict=True):
            if self.calibration is not None:  # int8: near float32 on images, not on noise
                if got.shape != want.shape or not np.isfinite(got).all():
                    raise RuntimeError("the int8 graph's outputs do not match the model's")
                continue
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


def check_engine(engine: str, precision: str, device: torch.device) -> None:
    """Raise when ``engine`` cannot run ``precision`` on ``device``, saying what can."""
    if precision == "int8":
        if engine == "torch":
            raise ValueError("precision='int8' runs in ONNX Runtime; use engine='auto' or "
                             "'onnx'.")
        if device.type != "cpu":
            raise ValueError(f"precision='int8' runs on the CPU; device is {device}. Use "
                             "device='cpu' or 'auto'.")
        if not onnx_available():
            raise ImportError("precision='int8' needs ONNX Runtime: pip install 'skt[onnx]'.")
        check_int8_available()
        return
    if engine == "onnx" and precision != "float32":
        raise ValueError(f"engine='onnx' runs float32 and int8; precision={precision!r} runs "
                         "in the torch engine. Use engine='auto' or 'torch'.")
    if engine == "onnx" and not onnx_available():
        raise ImportError("engine='onnx' needs ONNX Runtime: pip install 'skt[onnx]'.")
    if engine == "onnx" and device.type != "cpu":
        raise ValueError(f"engine='onnx' runs on the CPU only; device is {device}. Use "
                         "engine='auto' or 'torch'.")


def measure_engines(engines: dict, size: int, batch: int = MEASURED_BATCH,
                    rounds: int = 3) -> dict[str, float]:
    """Images per second of each engine's forward pass on a random batch: one warm-up,
    then the best of ``rounds`` rounds, run in turn so that a burst of load hits all."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    for run in engines.values():
        run(x)
    rates = dict.fromkeys(engines, 0.0)
    for _ in range(rounds):
        for name, run in engines.items():
            start = time.perf_counter()
            run(x)
            rates[name] = max(rates[name], batch / max(time.perf_counter() - start, 1e-9))
    return rates


def _choice_path(onnx_path: Path | None, threads: int | None) -> Path | None:
    """Where the measured choice of engine for this graph is kept, per machine."""
    if onnx_path is None:
        return None
    key = machine_key(threads or torch.get_num_threads())
    return onnx_path.with_name(f"{onnx_path.stem}-engine-{key}.json")


def _remembered(path: Path | None) -> dict | None:
    """The choice kept at ``path``; None when there is none or it does not read back."""
    if path is None:
        return None
    try:
        choice = json.loads(unseal(path, path.read_bytes()) or b"null")
    except (OSError, ValueError):
        return None
    if isinstance(choice, dict) and choice.get("engine") in ("torch", "onnx"):
        mark_used(path)
        return choice
    return None


def _choose(model: FeatureModel, device: torch.device, size: int,
            onnx_path: Path | None, threads: int | None, reuse: Sequence = ()):
    """engine="auto" on the CPU in float32: the faster engine, measured once per machine."""
    path = _choice_path(onnx_path, threads)
    choice = _remembered(path)
    if choice is not None:
        chosen = (TorchEngine(model, device, "float32", threads) if choice["engine"] == "torch"
                  else _onnx_or_torch(model, device, size, onnx_path, threads, reuse))
        if chosen.name == choice["engine"]:  # not a fallback after a failed export
            chosen.rates = choice.get("rates")
        return chosen
    exported = _onnx_or_torch(model, device, size, onnx_path, threads, reuse)
    if exported.name == "torch":  # the export failed: nothing to measure against
        return exported
    candidates = {"onnx": exported, "torch": TorchEngine(model, device, "float32", threads)}
    rates = measure_engines(candidates, size)
    best = max(rates, key=rates.get)
    chosen = candidates[best]
    chosen.rates = {name: round(rate, 1) for name, rate in rates.items()}
    if path is not None:
        text = json.dumps({"engine": best, "rates": chosen.rates, "batch": MEASURED_BATCH})
        write_cache_file(path, seal(path, text.encode()))
    return chosen


def _onnx_or_torch(model: FeatureModel, device: torch.device, size: int,
                   onnx_path: Path | None, threads: int | None, reuse: Sequence = ()):
    """ONNX Runtime, or torch with one warning naming the reason when the export fails."""
    try:
        return OnnxEngine(model, size, onnx_path, threads, reuse=reuse)
    except Exception as exc:  # the exporter raises many types; any failure means torch
        reason = _first_sentence(exc)
        warnings.warn(f"ONNX export failed ({reason}); using the torch engine.",
                      RuntimeWarning, stacklevel=4)
        return TorchEngine(model, device, "float32", threads)


def make_engine(model: FeatureModel, engine: str, device: torch.device, size: int,
                precision: str = "float32", onnx_path: Path | None = None,
                threads: int | None = None, *, calibration: dict | None = None,
                float_path: Path | None = None, reuse: Sequence[tuple[Path, list[int]]] = ()):
    """The engine for ``engine`` ("auto", "torch" or "onnx") on ``device``.

    "auto" on the CPU in float32, with ONNX Runtime installed, exports the
    graph and times both engines on a batch of :data:`MEASURED_BATCH` random
    images (:func:`measure_engines`), keeps the faster and remembers the
    choice, with the rates, next to the graph at ``onnx_path`` for this
    machine (:func:`~skt.extract.machine_key`), so later processes neither
    measure nor, when torch won, export again; without ``onnx_path`` the
    choice lasts as long as the engine. The chosen engine's ``rates`` holds
    the measurement. "auto" is torch on CUDA and MPS and without ONNX
    Runtime. A failed export falls back to torch with one warning naming
    the reason. ``reuse``: stored float32 graphs that compute these outputs
    among others (see :class:`OnnxEngine`). ``precision`` "float16" or "bfloat16" (as
    :func:`~skt.extract.resolve_precision` settles it) runs in torch, whose
    autocast gives it; "int8" runs in ONNX Runtime under ``calibration``, its
    float32 graph kept at ``float_path`` (see :class:`OnnxEngine`), and has
    no fallback. ``threads``: the CPU threads of the network; None means
    ``torch.get_num_threads()``. :func:`check_engine` says which combinations
    raise.
    """
    check_engine(engine, precision, device)
    if precision == "int8":
        if calibration is None:
            raise ValueError("precision='int8' needs the calibration fit computes.")
        return OnnxEngine(model, size, onnx_path, threads, calibration=calibration,
                          float_path=float_path)
    if (engine == "torch" or device.type != "cpu" or precision != "float32"
            or not onnx_available()):
        return TorchEngine(model, device, precision, threads)
    if engine == "auto":
        return _choose(model, device, size, onnx_path, threads, reuse)
    return _onnx_or_torch(model, device, size, onnx_path, threads, reuse)
