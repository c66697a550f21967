"""Batched, eval-mode forward passes that return per-layer pooling summaries."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from skt.backbones import Preprocessing, truncate
from skt.images import ImageDataset, collate
from skt.pooling import summarize, summary_kind

__all__ = [
    "FeatureModel",
    "LayerLayout",
    "OnnxEngine",
    "TorchEngine",
    "build_feature_model",
    "default_num_workers",
    "fingerprint_module",
    "iter_batches",
    "make_engine",
    "onnx_available",
    "resolve_device",
]


@dataclass(frozen=True)
class LayerLayout:
    """How one requested layer appears in the summaries and in the output."""

    name: str
    kind: str  # "stats", "flat" or "vector": see skt.pooling.summary_kind
    width: int  # columns of its summary


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


def build_feature_model(network: nn.Module, size: int, layers: list[str],
                        pooling: str) -> tuple[FeatureModel, list[LayerLayout]]:
    """Truncate ``network`` after ``layers`` and probe, at ``size`` px, the summaries' layout.

    ``network`` is modified (its classifier may be replaced): pass a copy.
    """
    model = FeatureModel(truncate(network, layers), layers, pooling).eval()
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


def fingerprint_module(module: nn.Module) -> str:
    """Content hash of a module's parameters and buffers (names, dtypes, values)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def resolve_device(device: str | torch.device, *, fallback: bool = False) -> torch.device:
    """``"auto"`` picks CUDA, then MPS, then CPU.

    An explicit CUDA or MPS device that is not available raises, unless
    ``fallback`` (a model fitted elsewhere and loaded here), which warns and
    uses the CPU.
    """
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device={str(device)!r} is not a torch device; use 'auto', 'cpu', "
                         "'cuda', 'cuda:1' or 'mps'.") from exc
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }.get(resolved.type, True)
    if available:
        return resolved
    if fallback:
        warnings.warn(f"device={str(device)!r} is not available on this machine; using the CPU.",
                      RuntimeWarning, stacklevel=3)
        return torch.device("cpu")
    raise ValueError(f"device={str(device)!r} is not available on this machine; use "
                     "device='auto' or 'cpu'.")


def default_num_workers() -> int:
    """Decoding workers for image files: one per core, up to 4."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))


class TorchEngine:
    """Runs a :class:`FeatureModel` eagerly: eval mode, ``inference_mode``, batches.

    On the CPU the model and inputs are channels-last, which oneDNN convolutions
    run faster. ``dtype`` ("float16" / "bfloat16") turns on autocast on CUDA only:
    on CPUs without bf16 units it is several times slower.
    """

    name = "torch"

    def __init__(self, model: FeatureModel, device: torch.device, dtype: str | None = None) -> None:
        self.device = device
        self.dtype = getattr(torch, dtype) if dtype and device.type == "cuda" else None
        self.memory_format = (torch.channels_last if device.type == "cpu"
                              else torch.contiguous_format)
        self.model = model.to(device=device, memory_format=self.memory_format).eval()

    def __call__(self, batch: torch.Tensor) -> list[np.ndarray]:
        with torch.inference_mode():
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
        processes skip the export; None keeps it in memory only.
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
        import onnxruntime

        if path is not None and path.is_file():
            graph = path.read_bytes()
        else:
            graph = _export_onnx(model, size)
            if path is not None:
                _write_atomically(path, graph)
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # Decoding workers share the cores: spinning threads would steal their time.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(graph, options,
                                                    providers=["CPUExecutionProvider"])
        self._check(model, size)

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


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def onnx_available() -> bool:
    """Whether ONNX Runtime and the exporter's dependencies import."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def make_engine(model: FeatureModel, engine: str, device: torch.device, size: int,
                dtype: str | None = None, onnx_path: Path | None = None):
    """The engine for ``engine`` ("auto", "torch" or "onnx") on ``device``.

    "auto" is ONNX Runtime on the CPU when it is installed, torch otherwise
    (CUDA and MPS always use torch). A failed export falls back to torch with
    one warning naming the reason.
    """
    if engine == "onnx" and not onnx_available():
        raise ImportError("engine='onnx' needs ONNX Runtime: pip install 'skt[onnx]'.")
    if engine == "onnx" and device.type != "cpu":
        raise ValueError(f"engine='onnx' runs on the CPU only; device is {device}. Use "
                         "engine='auto' or 'torch'.")
    if engine == "torch" or device.type != "cpu" or not onnx_available():
        return TorchEngine(model, device, dtype)
    try:
        return OnnxEngine(model, size, onnx_path)
    except Exception as exc:  # the exporter raises many types; any failure means torch
        reason = _first_sentence(exc)
        warnings.warn(f"ONNX export failed ({reason}); using the torch engine.",
                      RuntimeWarning, stacklevel=3)
        return TorchEngine(model, device, dtype)


def iter_batches(images: Sequence, config: Preprocessing, batch_size: int,
                 num_workers: int, indices: Sequence[int] | None = None,
                 ) -> Iterator[torch.Tensor]:
    """Preprocessed batches of ``images`` (or of the items at ``indices``), in order.

    With ``num_workers > 0``, image files are decoded and resized by that many
    threads, up to two batches ahead of the consumer, while the network runs:
    PIL's decoders, torch's resize and both engines release the GIL, and
    threads, unlike DataLoader processes, cost nothing to start on every call
    (a grid search transforms dozens of times). At most ``2 * batch_size``
    decoded images are held at once.
    """
    dataset = ImageDataset(images, config, indices)
    decode = any(isinstance(images[i], str | os.PathLike) for i in dataset.indices[:1])
    if num_workers == 0 or not decode or len(dataset) <= batch_size:
        for start in range(0, len(dataset), batch_size):
            yield collate([dataset[k] for k in range(start, min(start + batch_size,
                                                                 len(dataset)))])
        return
    window = 2 * batch_size
    with ThreadPoolExecutor(num_workers, thread_name_prefix="skt-decode") as pool:
        pending: deque = deque()
        submitted = 0
        batch: list = []
        while submitted < len(dataset) or pending:
            while submitted < len(dataset) and len(pending) < window:
                pending.append(pool.submit(dataset.__getitem__, submitted))
                submitted += 1
            batch.append(pending.popleft().result())
            if len(batch) == batch_size or (not pending and submitted == len(dataset)):
                try:
                    yield collate(batch)
                except BaseException:
                    for future in pending:
                        future.cancel()
                    raise
                batch = []
