"""Side-by-side comparisons of image classifiers, measured in one run.

The engine behind ``skt demo`` and the scripts in ``benchmarks/``: given
images, labels and a protocol (one stratified train/test split, or K-fold
cross-validation), it fits each :class:`Row` on the training images, scores
it on the held-out ones and reports accuracy, balanced accuracy, macro-F1,
ROC-AUC and wall-clock fit and predict seconds.

Rows read an :class:`Input`: the images themselves, or something computed
once from all of them and shared by several rows, such as downsampled raw
pixels (:func:`pixel_input`) or a warm feature cache (:func:`feature_input`).
The time an input takes is charged to every row that reads it, per image, so
fit and predict seconds stay comparable between rows.

:func:`write_results` saves ``results.json`` (every metric, timing, best
hyper-parameter, the data set, split sizes, seed and machine),
``results.md`` (a Markdown table) and ``results.png`` (a bar chart; needs
matplotlib, from ``pip install 'skt[bench]'``).

Examples
--------
>>> import numpy as np
>>> from sklearn.dummy import DummyClassifier
>>> from sklearn.linear_model import LogisticRegression
>>> from skt.benchmark import Row, pixel_input, run_comparison
>>> rng = np.random.default_rng(0)
>>> X = rng.integers(0, 100, (40, 8, 8), dtype=np.uint8)
>>> y = np.arange(40) % 2
>>> X[y == 1] += 100  # class 1 is brighter
>>> rows = [Row("Majority class", DummyClassifier()),
...         Row("Raw pixels + LogisticRegression", LogisticRegression(), input="pixels")]
>>> results = run_comparison(X, y, rows, inputs=[pixel_input(size=None)],
...                          random_state=0, verbose=0)
>>> [round(row["metrics"]["accuracy"], 2) for row in results["rows"]]
[0.5, 1.0]
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from sklearn.base import BaseEstimator, clone
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from threadpoolctl import threadpool_limits

from skt._version import __version__
from skt.backbones import Preprocessing
from skt.cache import cache_info
from skt.extract import default_num_workers, iter_batches, resolve_device
from skt.extractor import FeatureExtractor
from skt.images import as_image_list, load_image

__all__ = [
    "HEAD_BLAS_THREADS",
    "METRICS",
    "Input",
    "Reference",
    "Row",
    "compare_with_imagenet",
    "downsample",
    "feature_input",
    "feature_rows",
    "finetune_row",
    "format_imagenet_comparison",
    "format_machine",
    "format_table",
    "imagenet_top1",
    "machine_info",
    "majority_row",
    "markdown_table",
    "pixel_input",
    "pixel_rows",
    "plot_results",
    "run_comparison",
    "score_predictions",
    "write_results",
]

HEAD_BLAS_THREADS = 1
"""BLAS threads (NumPy/SciPy) while rows fit and predict. The heads' problems
are small (thousands of rows, at most a few thousand columns), where threads
add synchronisation and no speed; on a machine shared with other jobs,
spinning BLAS threads made a 480 x 1024 LogisticRegression fit 75 x slower
than one thread. Torch's own threads (FineTuneClassifier, extraction) are not
affected."""

METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc")
"""Keys of each row's ``metrics``, in table order."""

_HEADERS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced acc.",
    "f1_macro": "macro-F1",
    "roc_auc": "ROC-AUC",
    "fit_seconds": "fit s",
    "predict_seconds": "predict s",
}


# ---------------------------------------------------------------- machine --

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """The machine a comparison runs on: cores, torch threads, device, versions.

    Examples
    --------
    >>> from skt.benchmark import machine_info
    >>> info = machine_info()
    >>> info["cpu_cores"] >= 1 and info["torch_threads"] >= 1
    True
    """
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    return {
        "cpu": _cpu_model(),
        "cpu_cores": cores,
        "torch_threads": torch.get_num_threads(),
        "device": str(resolve_device("auto")),
        "decoding_workers": default_num_workers(),
        "blas_threads_for_heads": HEAD_BLAS_THREADS,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "skt": __version__,
    }


def format_machine(info: dict[str, Any]) -> str:
    """One line describing ``info`` from :func:`machine_info`."""
    load = info.get("load_average")
    busy = f", load average {load[0]:.1f}" if load else ""
    return (f"Machine: {info['cpu']}, {info['cpu_cores']} CPU cores, "
            f"{info['torch_threads']} torch threads, device {info['device']}{busy}; "
            f"torch {info['torch']}, torchvision {info['torchvision']}, "
            f"scikit-learn {info['scikit-learn']}, skt {info['skt']}")


# ----------------------------------------------------------------- inputs --

@dataclass
class Input:
    """What rows read, computed once from all images.

    Parameters
    ----------
    name : str
        The key rows use in ``Row.input``.
    prepare : callable
        ``prepare(images) -> (X, note)``: the rows' input for all images (row
        ``i`` of ``X`` for image ``i``; an array, or a list such as the images
        themselves) and a one-line note on how it was computed.
    description : str
        What it is, printed before it is computed.
    """

    name: str
    prepare: Callable[[Any], tuple[Any, str]]
    description: str = ""


def downsample(images: Any, size: int | None = 32) -> np.ndarray:
    """Raw pixels as feature rows: each image resized to ``size`` x ``size``, in [0, 1].

    Images whose three channels are equal everywhere (grayscale) keep one
    channel, so a row has ``size * size`` values, else ``3 * size * size``.

    Parameters
    ----------
    images : images
        Anything :mod:`skt.images` accepts.
    size : int or None, default=32
        The shorter side is resized to ``size`` (bilinear, antialiased), then
        the centre ``size`` x ``size`` square is kept; image files are decoded
        in DataLoader workers. None keeps the pixels as they are: the images
        must then share one size.

    Returns
    -------
    ndarray of shape (n_images, n_pixels), dtype float32

    Examples
    --------
    >>> import numpy as np
    >>> from skt.benchmark import downsample
    >>> downsample(np.full((3, 64, 64), 255, dtype=np.uint8), size=8).shape
    (3, 64)
    >>> float(downsample(np.full((1, 4, 4, 3), 255, dtype=np.uint8), size=None).max())
    1.0
    """
    items = as_image_list(images)
    if size is None:
        batches = [_as_is(items)]
    else:
        config = Preprocessing(crop_size=size, resize_size=size, mean=(0.0, 0.0, 0.0),
                               std=(1.0, 1.0, 1.0), interpolation="bilinear")
        batches = list(iter_batches(items, config, 256, default_num_workers()))
    stack = torch.cat(batches).clamp(0, 1)
    if bool((stack == stack[:, :1]).all()):
        stack = stack[:, :1]
    return stack.flatten(1).numpy()


def _as_is(items) -> torch.Tensor:
    pixels = []
    for index in range(len(items)):
        image = TF.to_dtype(load_image(items[index], index), torch.float32, scale=True)
        if pixels and image.shape != pixels[0].shape:
            raise ValueError(f"Image {index} is {tuple(image.shape[1:])} pixels but image 0 "
                             f"is {tuple(pixels[0].shape[1:])}; pass a size to resize them "
                             "all to one.")
        pixels.append(image)
    return torch.stack(pixels)


def pixel_input(size: int | None = 32, name: str = "pixels") -> Input:
    """Downsampled raw pixels (:func:`downsample`) as an :class:`Input`."""
    shown = "as they are" if size is None else f"resized to {size}x{size}"
    description = f"raw pixels {shown}, scaled to [0, 1]"

    def prepare(images):
        pixels = downsample(images, size)
        return pixels, f"{description}, {pixels.shape[1]} values per image"

    return Input(name, prepare, description)


def _count_entries(cache: str | os.PathLike) -> int:
    return cache_info(cache)["entries"] if Path(cache).is_dir() else 0


def feature_input(extractor: FeatureExtractor, name: str | None = None) -> Input:
    """Fill ``extractor``'s feature cache with every image; rows then read the images.

    The rows of :func:`feature_rows` put a clone of ``extractor`` in a
    pipeline; with a warm cache their grid searches read features instead of
    running the backbone. The extraction time (or the cache reading time,
    when a previous run already filled it) is charged to those rows.

    Parameters
    ----------
    extractor : FeatureExtractor
        Unfitted, with ``cache`` set.
    name : str, optional
        Input name; default the backbone name.
    """
    if extractor.cache is None:
        raise ValueError("feature_input needs FeatureExtractor(cache=...): the rows' grid "
                         "searches read the features from the cache.")
    name = name or str(extractor.backbone)

    def prepare(images):
        before = _count_entries(extractor.cache)
        fitted = clone(extractor).fit(images)
        fitted.transform(images)
        added = _count_entries(extractor.cache) - before
        source = (f"computed by the {fitted.engine_} engine" if added
                  else "read from the cache of an earlier run")
        return images, (f"{name} at {fitted.preprocessing_.crop_size} px, "
                        f"{fitted.n_features_out_} features, {source}")

    return Input(name, prepare, f"{name} features into the cache {extractor.cache}")


# ------------------------------------------------------------------- rows --

@dataclass
class Row:
    """One line of a comparison.

    Parameters
    ----------
    name : str
        Label in tables and charts.
    estimator : estimator
        An unfitted classifier (often a ``GridSearchCV``); cloned for every
        split, fitted on the training part of ``input``.
    input : str, default="images"
        The :class:`Input` it reads, or ``"images"`` for the images as given.
    group : str, default=""
        What it belongs to ("baseline", "raw pixels", a backbone name, ...).
    description : str, default=""
        Hyper-parameters and grid, for the report.
    info : dict
        Anything else to keep in ``results.json`` (e.g. ``{"backbone": ...}``).
    """

    name: str
    estimator: BaseEstimator
    input: str = "images"
    group: str = ""
    description: str = ""
    info: dict = field(default_factory=dict)


@dataclass
class Reference:
    """A published result, shown beside the measured rows (never measured here)."""

    label: str
    accuracy: float
    source: str


def _search(estimator, grid: dict, cv: int, random_state: int | None) -> GridSearchCV:
    folds = StratifiedKFold(cv, shuffle=True, random_state=random_state)
    return GridSearchCV(estimator, grid, cv=folds, scoring="accuracy", error_score="raise")


def _grid_text(grid: dict) -> str:
    return ", ".join(f"{key.split('__')[-1]} in {list(values)}" for key, values in grid.items())


def majority_row() -> Row:
    """Always predicts the most frequent training class."""
    return Row("Majority class", DummyClassifier(strategy="most_frequent"), group="baseline",
               description="DummyClassifier(strategy='most_frequent')")


def pixel_rows(input: str = "pixels", cv: int = 5, random_state: int | None = 0,
               svc: bool = False) -> list[Row]:
    """Raw-pixel rows: LogisticRegression, LinearSVC, PCA + LDA (and SVC with ``svc``).

    Each is a ``GridSearchCV`` (``cv`` stratified folds, accuracy) over a
    ``StandardScaler`` pipeline. LDA on raw pixels needs PCA first: neighbouring
    pixels are nearly collinear, so their within-class covariance is singular.
    """
    searches = [
        ("LogisticRegression", LogisticRegression(max_iter=2000),
         {"head__C": [0.001, 0.01, 0.1, 1.0]}),
        ("LinearSVC", LinearSVC(max_iter=5000), {"head__C": [0.0001, 0.001, 0.01]}),
        ("PCA + LinearDiscriminantAnalysis", _pca_lda(random_state), _PCA_GRID),
    ]
    if svc:
        searches.append(("SVC (RBF)", SVC(), {"head__C": [1.0, 10.0, 100.0]}))
    rows = []
    for label, head, grid in searches:
        pipeline = Pipeline([("scale", StandardScaler()), ("head", head)])
        rows.append(Row(f"Raw pixels + {label}", _search(pipeline, grid, cv, random_state),
                        input=input, group="raw pixels",
                        description=f"StandardScaler + {label}; {_grid_text(grid)}"))
    return rows


_PCA_GRID = {"head__pca__n_components": [16, 64, 128]}


class _CappedPCA(PCA):
    """PCA keeping at most as many components as the data have samples and features.

    One grid of component counts then serves every data size: a count larger
    than the data allow keeps them all, and ties with the next smaller count.
    """

    def fit(self, X, y=None):
        self.fit_transform(X)
        return self

    def fit_transform(self, X, y=None):
        requested = self.n_components
        if isinstance(requested, int):
            self.n_components = min(requested, *np.shape(X))
        try:
            return super().fit_transform(X, y)
        finally:
            self.n_components = requested


def _pca_lda(random_state: int | None) -> Pipeline:
    return Pipeline([("pca", _CappedPCA(random_state=random_state)),
                     ("lda", LinearDiscriminantAnalysis())])


def feature_rows(extractor: FeatureExtractor, input: str | None = None, cv: int = 5,
                 random_state: int | None = 0, heads: Sequence[str] = ("logreg", "svc", "lda"),
                 label: str | None = None) -> list[Row]:
    """Rows of ``GridSearchCV(Pipeline(extractor, [StandardScaler], head))`` on images.

    Parameters
    ----------
    extractor : FeatureExtractor
        With ``cache`` set, so that the searches read the features once
        :func:`feature_input` has computed them.
    input : str, optional
        Name of that :class:`Input`; default the backbone name.
    cv : int, default=5
        Stratified folds of each grid search (scored by accuracy).
    random_state : int or None, default=0
        Shuffles the folds.
    heads : sequence of {"logreg", "svc", "lda"}
        ``StandardScaler + LogisticRegression`` over C; ``StandardScaler +
        SVC`` (RBF, gamma="scale") over C; ``StandardScaler + PCA +
        LinearDiscriminantAnalysis`` over the number of components. PCA keeps
        the within-class covariance invertible with fewer images than
        features, and costs a tenth of a shrinkage LDA on 1,280 features.
    label : str, optional
        Row-name prefix; default "<backbone> features".
    """
    backbone = str(extractor.backbone)
    input = input or backbone
    label = label or f"{_short(backbone)} features"
    choices = {
        "logreg": ("LogisticRegression", LogisticRegression(max_iter=2000),
                   {"head__C": [0.001, 0.01, 0.1, 1.0]}),
        "svc": ("SVC (RBF)", SVC(), {"head__C": [0.1, 1.0, 10.0, 100.0]}),
        "lda": ("PCA + LinearDiscriminantAnalysis", _pca_lda(random_state), _PCA_GRID),
    }
    unknown = set(heads) - set(choices)
    if unknown:
        raise ValueError(f"Unknown heads {sorted(unknown)}; choose from {sorted(choices)}.")
    quiet = clone(extractor).set_params(verbose=0)
    rows = []
    for key in heads:
        name, head, grid = choices[key]
        pipeline = Pipeline([("features", quiet), ("scale", StandardScaler()), ("head", head)])
        rows.append(Row(f"{label} + {name}", _search(pipeline, grid, cv, random_state),
                        input=input, group=backbone,
                        description=f"FeatureExtractor + StandardScaler + {name}; "
                                    f"{_grid_text(grid)}",
                        info={"backbone": backbone, "head": key,
                              "image_size": extractor.image_size}))
    return rows


def _short(backbone: str) -> str:
    if backbone.startswith("efficientnet_lite"):
        return "Lite" + backbone.removeprefix("efficientnet_lite")
    return backbone


def finetune_row(backbone: str = "efficientnet_lite0", image_size: int = 128,
                 max_iter: int = 2, freeze: int | None = 3, batch_size: int = 32,
                 learning_rate_init: float = 1e-3, random_state: int | None = 0,
                 verbose: int = 0, **params) -> Row:
    """A :class:`skt.finetune.FineTuneClassifier` with a fixed budget (no search).

    ``freeze=3`` keeps the stem and the first two block stages of an
    EfficientNet at their ImageNet weights. Backpropagating through those
    high-resolution depthwise convolutions is most of a CPU training step:
    on ELPV (1,968 images, 128 px, 2 epochs, 2 cores shared with other jobs)
    it cut the fit from 481 s to 101 s, for about one point of accuracy
    (0.848 unfrozen, 0.832-0.841 frozen). Extra keyword arguments go to the
    classifier.
    """
    from skt.finetune import FineTuneClassifier

    estimator = FineTuneClassifier(backbone, image_size=image_size, max_iter=max_iter,
                                   freeze=freeze, batch_size=batch_size,
                                   learning_rate_init=learning_rate_init, num_workers=None,
                                   random_state=random_state, verbose=verbose, **params)
    epochs = "epoch" if max_iter == 1 else "epochs"
    return Row(f"{_short(backbone)} fine-tuned ({max_iter} {epochs}, {image_size} px)", estimator,
               group="fine-tuned",
               description=(f"FineTuneClassifier({backbone!r}, image_size={image_size}, "
                            f"max_iter={max_iter}, freeze={freeze}, batch_size={batch_size}, "
                            f"learning_rate_init={learning_rate_init}) with its defaults "
                            "otherwise (AdamW, cosine schedule, backbone at 0.1x the head's "
                            "learning rate); no search"),
               info={"backbone": backbone, "image_size": image_size, "max_iter": max_iter,
                     "freeze": freeze})


def imagenet_top1(backbone: str) -> float | None:
    """Published ImageNet top-1 accuracy (%) of a backbone's default weights, if known.

    Examples
    --------
    >>> from skt.benchmark import imagenet_top1
    >>> imagenet_top1("efficientnet_lite0")
    75.1
    >>> imagenet_top1("resnet18")
    69.758
    """
    from skt.backbones.efficientnet_lite import LITE_VARIANTS

    if backbone in LITE_VARIANTS:
        return LITE_VARIANTS[backbone].top1
    try:
        weights = torchvision.models.get_model_weights(backbone).DEFAULT
        return float(weights.meta["_metrics"]["ImageNet-1K"]["acc@1"])
    except (ValueError, KeyError, AttributeError):
        return None


def compare_with_imagenet(results: dict, backbones: Sequence[str]) -> dict | None:
    """Linear-probe accuracy against ImageNet top-1 accuracy, per backbone.

    After Kornblith, Shlens & Le, "Do Better ImageNet Models Transfer
    Better?" (CVPR 2019). The linear probe is the backbone's
    ``feature_rows`` LogisticRegression row. None unless at least two of
    ``backbones`` have both a known top-1 accuracy (:func:`imagenet_top1`)
    and such a row in ``results``.

    Returns
    -------
    dict or None
        ``points`` (backbone, ``imagenet_top1`` in %, ``linear_probe_accuracy``),
        ``pearson_r`` and ``spearman_rho`` (None when a column is constant) and
        a ``note``.
    """
    from scipy.stats import pearsonr, spearmanr

    points = []
    for backbone in backbones:
        top1 = imagenet_top1(backbone)
        probes = [row for row in results["rows"]
                  if row.get("backbone") == backbone and row.get("head") == "logreg"]
        if top1 is not None and probes:
            points.append({"backbone": backbone, "imagenet_top1": top1,
                           "linear_probe_accuracy": probes[0]["metrics"]["accuracy"]})
    if len(points) < 2:
        return None
    top1 = [p["imagenet_top1"] for p in points]
    accuracy = [p["linear_probe_accuracy"] for p in points]
    constant = len(set(top1)) < 2 or len(set(accuracy)) < 2
    return {
        "points": points,
        "pearson_r": None if constant else float(pearsonr(top1, accuracy)[0]),
        "spearman_rho": None if constant else float(spearmanr(top1, accuracy)[0]),
        "note": ("linear probe = features + StandardScaler + LogisticRegression, C by grid "
                 f"search; {len(points)} networks, so the correlation is indicative only "
                 "(Kornblith et al., 2019, used 16)."),
    }


def format_imagenet_comparison(summary: dict) -> str:
    """:func:`compare_with_imagenet`'s result as a small text table."""
    lines = ["Do better ImageNet models transfer better? (Kornblith et al., 2019)",
             f"{'backbone':<22}{'ImageNet top-1':>16}{'linear probe':>14}"]
    lines += [f"{p['backbone']:<22}{p['imagenet_top1']:>15.1f}%"
              f"{p['linear_probe_accuracy']:>14.3f}" for p in summary["points"]]
    if summary["pearson_r"] is None:
        lines.append("correlation: undefined (a constant column)")
    else:
        lines.append(f"Pearson r = {summary['pearson_r']:.2f}, "
                     f"Spearman rho = {summary['spearman_rho']:.2f}")
    lines.append(summary["note"])
    return "\n".join(lines)


# ---------------------------------------------------------------- scoring --

def _scores(estimator, X) -> np.ndarray | None:
    if hasattr(estimator, "predict_proba"):
        return estimator.predict_proba(X)
    if hasattr(estimator, "decision_function"):
        return estimator.decision_function(X)
    return None


def score_predictions(y_true, y_pred, scores: np.ndarray | None,
                      classes: Sequence) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1 and ROC-AUC of one set of predictions.

    ``scores`` are ``predict_proba`` or ``decision_function`` outputs with
    columns in the order of ``classes`` (one column, or a 1-D array, for the
    positive class of a binary problem). ROC-AUC is one-vs-rest, averaged
    over classes; it needs only the ranking of each column, so decision
    values serve as well as probabilities. It is NaN without scores or when
    the true labels hold a single class.

    Examples
    --------
    >>> import numpy as np
    >>> from skt.benchmark import score_predictions
    >>> y = np.array([0, 0, 1, 1])
    >>> m = score_predictions(y, np.array([0, 1, 1, 1]), np.array([0.1, 0.6, 0.7, 0.9]), [0, 1])
    >>> m["accuracy"], m["balanced_accuracy"], m["roc_auc"]
    (0.75, 0.75, 1.0)
    """
    y_true = np.asarray(y_true)
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "roc_auc": float("nan"),
    }
    if scores is None or len(np.unique(y_true)) < 2:
        return metrics
    scores = np.asarray(scores, dtype=np.float64)
    classes = list(classes)
    if len(classes) == 2:
        positive = scores if scores.ndim == 1 else scores[:, -1]
        metrics["roc_auc"] = float(roc_auc_score(y_true == classes[1], positive))
    else:
        aucs = [roc_auc_score(y_true == label, scores[:, k]) for k, label in enumerate(classes)
                if 0 < np.sum(y_true == label) < len(y_true)]
        metrics["roc_auc"] = float(np.mean(aucs))
    return metrics


# ----------------------------------------------------------------- engine --

def _take(X, indices: np.ndarray):
    if isinstance(X, np.ndarray | torch.Tensor):
        return X[indices]
    return [X[i] for i in indices]


def _splits(y, stratify, test_size: float, cv: int | None, random_state: int | None,
            split) -> list[tuple[np.ndarray, np.ndarray]]:
    indices = np.arange(len(y))
    if split is not None:
        train, test = (np.asarray(part, dtype=np.intp) for part in split)
        if cv is not None:
            raise ValueError("Pass either split (a fixed train/test split) or cv, not both.")
        if np.intersect1d(train, test).size or min(train.min(), test.min()) < 0 or max(
                train.max(), test.max()) >= len(y):
            raise ValueError(f"split must be two disjoint index arrays into the {len(y)} "
                             "images (train, test).")
        return [(train, test)]
    if cv is None:
        train, test = train_test_split(indices, test_size=test_size, stratify=stratify,
                                       random_state=random_state)
        return [(np.sort(train), np.sort(test))]
    folds = StratifiedKFold(cv, shuffle=True, random_state=random_state)
    return list(folds.split(indices, stratify))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None  # JSON has no NaN
    if isinstance(value, BaseEstimator):
        return repr(value)
    return value


def _say(verbose: int, text: str) -> None:
    if verbose:
        print(text, flush=True)


def _run_row(row: Row, X, y, splits, input_seconds: float, n_images: int,
             verbose: int) -> dict[str, Any]:
    folds = []
    for train, test in splits:
        estimator = clone(row.estimator)
        X_train, X_test = _take(X, train), _take(X, test)
        with threadpool_limits(HEAD_BLAS_THREADS, user_api="blas"):
            start = time.perf_counter()
            estimator.fit(X_train, y[train])
            fit_seconds = time.perf_counter() - start
            start = time.perf_counter()
            predicted = estimator.predict(X_test)
            predict_seconds = time.perf_counter() - start
            scores = _scores(estimator, X_test)
        metrics = score_predictions(y[test], predicted, scores, estimator.classes_)
        share = input_seconds / n_images
        folds.append({
            "metrics": metrics,
            "fit_seconds": fit_seconds + share * len(train),
            "predict_seconds": predict_seconds + share * len(test),
            "input_fit_seconds": share * len(train),
            "input_predict_seconds": share * len(test),
            "best_params": getattr(estimator, "best_params_", None),
            "n_train": len(train),
            "n_test": len(test),
        })
        if verbose > 1 and len(splits) > 1:
            _say(verbose, f"      fold {len(folds)}: accuracy {metrics['accuracy']:.3f}")
    keys = ("fit_seconds", "predict_seconds", "input_fit_seconds", "input_predict_seconds")
    result = {
        "name": row.name,
        "group": row.group,
        "input": row.input,
        "description": row.description,
        **row.info,
        "metrics": {m: float(np.mean([f["metrics"][m] for f in folds])) for m in METRICS},
        "metrics_std": {m: float(np.std([f["metrics"][m] for f in folds])) for m in METRICS},
        **{key: float(np.mean([f[key] for f in folds])) for key in keys},
        "best_params": [f["best_params"] for f in folds],
        "folds": folds,
    }
    return _jsonable(result)


def run_comparison(images, y, rows: Sequence[Row], *, inputs: Sequence[Input] = (),
                   test_size: float = 0.25, cv: int | None = None, split=None, stratify=None,
                   random_state: int | None = 0, dataset: dict | None = None,
                   references: Sequence[Reference] = (), title: str = "Comparison",
                   verbose: int = 1) -> dict[str, Any]:
    """Fit and score every row on one split or on K folds, in one run.

    Parameters
    ----------
    images : images
        Anything :mod:`skt.images` accepts (paths, arrays, ...).
    y : array-like of shape (n_images,)
        Class labels.
    rows : sequence of Row
        Run in order; each is cloned for each split.
    inputs : sequence of Input, default=()
        Computed once from all images before the rows that read them.
    test_size : float, default=0.25
        Held-out share of the single split (ignored with ``cv``).
    cv : int, optional
        Stratified K-fold cross-validation instead of one split: metrics are
        the mean over folds, with their standard deviation.
    split : (train, test) index arrays, optional
        A fixed split (e.g. a data set's official one) instead of a random
        one; not with ``cv``.
    stratify : array-like, optional
        Labels to stratify the split or folds on; default ``y``.
    random_state : int or None, default=0
        Seeds the split or the fold assignment.
    dataset : dict, optional
        Description of the data set, stored in the results.
    references : sequence of Reference, default=()
        Published results shown beside the table.
    title : str, default="Comparison"
        Heading of the table and chart.
    verbose : int, default=1
        0 prints nothing; 1 prints the machine, one line per row as it
        starts and ends, and the table; 2 adds per-fold scores.

    Returns
    -------
    results : dict
        ``title``, ``dataset``, ``protocol`` (split sizes, seed), ``machine``,
        ``inputs`` (seconds each), ``rows`` (per row: ``metrics``,
        ``metrics_std``, ``fit_seconds``, ``predict_seconds``, the input time
        included in those, ``best_params`` and per-fold details),
        ``references`` and ``wall_seconds``. JSON-ready.
    """
    start = time.perf_counter()
    machine = machine_info()
    _say(verbose, format_machine(machine))
    images = as_image_list(images)
    y = np.asarray(y)
    if len(y) != len(images):
        raise ValueError(f"{len(images)} images but {len(y)} labels; pass one label per image.")
    stratify = y if stratify is None else np.asarray(stratify)
    splits = _splits(y, stratify, test_size, cv, random_state, split)
    by_name = {item.name: item for item in inputs}
    missing = {row.input for row in rows} - set(by_name) - {"images"}
    if missing:
        raise ValueError(f"Rows read inputs {sorted(missing)} that are not in inputs "
                         f"({sorted(by_name)}); add them or fix Row.input.")
    protocol = {
        "kind": ("fixed split" if split is not None else "split" if cv is None
                 else "cross-validation"),
        "test_size": test_size if cv is None and split is None else None,
        "n_splits": 1 if cv is None else cv,
        "n_train": [len(train) for train, _ in splits],
        "n_test": [len(test) for _, test in splits],
        "random_state": random_state,
    }
    _say(verbose, _protocol_text(len(images), protocol))

    prepared: dict[str, Any] = {"images": images}
    input_log: dict[str, dict] = {}
    results = []
    for number, row in enumerate(rows, start=1):
        if row.input not in prepared:
            item = by_name[row.input]
            _say(verbose, f"Preparing {item.name}: {item.description} for {len(images)} images")
            begin = time.perf_counter()
            prepared[row.input], note = item.prepare(images)
            seconds = time.perf_counter() - begin
            input_log[item.name] = {"description": note, "seconds": seconds}
            _say(verbose, f"  {note}: {seconds:.1f} s")
        _say(verbose, f"[{number}/{len(rows)}] {row.name} ...")
        seconds = input_log.get(row.input, {}).get("seconds", 0.0)
        result = _run_row(row, prepared[row.input], y, splits, seconds, len(images), verbose)
        results.append(result)
        _say(verbose, f"      accuracy {_cell(result, 'accuracy')}, "
                      f"balanced {_cell(result, 'balanced_accuracy')}, "
                      f"fit {result['fit_seconds']:.1f} s, "
                      f"predict {result['predict_seconds']:.1f} s"
                      + _best_text(result["best_params"]))
    report = _jsonable({
        "title": title,
        "dataset": dataset or {},
        "protocol": protocol,
        "machine": machine,
        "inputs": input_log,
        "rows": results,
        "references": [vars(r) for r in references],
        "wall_seconds": time.perf_counter() - start,
    })
    _say(verbose, "\n" + format_table(report))
    return report


def _protocol_text(n_images: int, protocol: dict) -> str:
    if protocol["kind"] == "fixed split":
        return (f"Protocol: the given split of {n_images} images, {protocol['n_train'][0]} for "
                f"training and {protocol['n_test'][0]} for testing.")
    if protocol["kind"] == "split":
        return (f"Protocol: one stratified split of {n_images} images, "
                f"{protocol['n_train'][0]} for training and {protocol['n_test'][0]} for "
                f"testing (seed {protocol['random_state']}).")
    return (f"Protocol: stratified {protocol['n_splits']}-fold cross-validation of "
            f"{n_images} images (seed {protocol['random_state']}); mean ± std over folds.")


def _best_text(best: list) -> str:
    if len(best) != 1 or not best[0]:
        return ""
    return "; best " + ", ".join(f"{k.split('__')[-1]}={v}" for k, v in best[0].items())


# ----------------------------------------------------------------- output --

def _cell(row: dict, key: str) -> str:
    if key in row["metrics"]:
        value, spread = row["metrics"][key], row["metrics_std"][key]
        if value is None or np.isnan(value):
            return "n/a"
        return f"{value:.3f}" + (f" ± {spread:.3f}" if len(row["folds"]) > 1 else "")
    return f"{row[key]:.1f}"


def _columns() -> list[str]:
    return [*METRICS, "fit_seconds", "predict_seconds"]


def _reference_text(references: list[dict]) -> list[str]:
    return [f"{ref['label']}: {100 * ref['accuracy']:.2f} % accuracy ({ref['source']})"
            for ref in references]


def format_table(results: dict) -> str:
    """The rows as a plain-text table, followed by the published references."""
    columns = _columns()
    header = ["row", *(_HEADERS[c] for c in columns)]
    lines = [[row["name"], *(_cell(row, c) for c in columns)] for row in results["rows"]]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def render(cells):
        return "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                         for i, cell in enumerate(cells))

    text = [results["title"], render(header), "  ".join("-" * w for w in widths)]
    text += [render(line) for line in lines]
    if results["references"]:
        text.append("Published reference, not measured here:")
        text += [f"  {line}" for line in _reference_text(results["references"])]
    return "\n".join(text)


def markdown_table(results: dict) -> str:
    """The rows as a Markdown table with notes on protocol, timing and references."""
    columns = _columns()
    lines = [
        "| " + " | ".join(["Row", *(_HEADERS[c] for c in columns)]) + " |",
        "|---" + "|---:" * len(columns) + "|",
    ]
    for row in results["rows"]:
        lines.append("| " + " | ".join([row["name"], *(_cell(row, c) for c in columns)]) + " |")
    n = sum(results["protocol"]["n_train"][:1] + results["protocol"]["n_test"][:1])
    notes = ["", _protocol_text(n, results["protocol"]) + " Heads tuned by grid search on the "
             "training part only."]
    dataset = results["dataset"]
    if dataset.get("name"):
        details = [dataset.get("note"), dataset.get("licence") and f"licence {dataset['licence']}"]
        notes.append(f"Data: {dataset['name']}" + "".join(f"; {d}" for d in details if d) + ".")
    shared = [f"{name} ({log['description']}, {log['seconds']:.1f} s for all images)"
              for name, log in results["inputs"].items()]
    if shared:
        notes.append("Fit and predict seconds include each row's share of computing its input "
                     "once for all images: " + "; ".join(shared) + ".")
    notes.append(format_machine(results["machine"]) + ".")
    if results["references"]:
        notes.append("Published reference, not measured here: "
                     + "; ".join(_reference_text(results["references"])) + ".")
    return "\n".join(lines + [f"{note}\n" if note else note for note in notes])


def plot_results(results: dict, path: str | os.PathLike) -> Path:
    """Bar chart of accuracy and balanced accuracy per row, best first.

    Published references are dashed horizontal lines. Needs matplotlib
    (``pip install 'skt[bench]'``); no pyplot state is touched.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("The chart needs matplotlib: pip install matplotlib "
                          "(or pip install 'skt[bench]').") from exc
    rows = sorted(results["rows"], key=lambda r: r["metrics"]["accuracy"], reverse=True)
    positions = np.arange(len(rows))
    figure = Figure(figsize=(max(7.0, 0.9 * len(rows) + 3), 5.5), layout="constrained")
    axes = figure.add_subplot()
    for offset, key, label in ((-0.2, "accuracy", "accuracy"),
                               (0.2, "balanced_accuracy", "balanced accuracy")):
        values = [r["metrics"][key] for r in rows]
        errors = [r["metrics_std"][key] for r in rows] if len(rows[0]["folds"]) > 1 else None
        bars = axes.bar(positions + offset, values, width=0.4, yerr=errors, label=label,
                        capsize=3)
        if key == "accuracy":
            axes.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    styles = ("--", ":", "-.")
    for i, reference in enumerate(results["references"]):
        axes.axhline(reference["accuracy"], color="0.3", linestyle=styles[i % len(styles)],
                     linewidth=1.2,
                     label=f"{reference['label']} ({100 * reference['accuracy']:.2f} %, published)")
    axes.set_xticks(positions, [r["name"] for r in rows], rotation=30, ha="right", fontsize=8)
    low = min(r["metrics"]["balanced_accuracy"] for r in rows)
    axes.set_ylim(max(0.0, min(0.5, low) - 0.05), 1.0)
    axes.set_ylabel("score on held-out images")
    axes.grid(axis="y", alpha=0.3)
    axes.set_title(results["title"], fontsize=10)
    figure.legend(fontsize=8, loc="outside lower center", ncols=2, frameon=False)
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def write_results(results: dict, output: str | os.PathLike, chart: bool = True) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and (with ``chart``) ``results.png``.

    Returns
    -------
    dict
        ``{"json": path, "markdown": path, "chart": path}`` (no ``"chart"``
        without it).
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "results.json", "markdown": output / "results.md"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(f"### {results['title']}\n\n{markdown_table(results)}",
                                 encoding="utf-8")
    if chart:
        paths["chart"] = plot_results(results, output / "results.png")
    return paths
