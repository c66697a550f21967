"""The rows of a comparison: baselines, pretrained features with heads, fine-tuning."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torchvision
from sklearn.base import BaseEstimator, clone
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from skt.extractor import FeatureExtractor

__all__ = [
    "Reference",
    "Row",
    "compare_with_imagenet",
    "feature_rows",
    "finetune_row",
    "format_imagenet_comparison",
    "imagenet_top1",
    "majority_row",
    "pixel_rows",
]

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


def finetune_row(backbone: str = "efficientnet_lite0", image_size: int = 224,
                 max_iter: int = 6, freeze: int | str | None = "auto", batch_size: int = 32,
                 learning_rate_init: float = 3e-3, random_state: int | None = 0,
                 verbose: int = 0, **params) -> Row:
    """A :class:`skt.FineTuneClassifier` with a fixed budget (no search).

    ``freeze="auto"`` keeps the first two thirds of the stages (6 of
    EfficientNet-Lite0's 9) at their ImageNet weights; they are computed
    once per image (``frozen_cache``), so an epoch after the first costs a
    fraction of a full one. Extra keyword arguments (``head_init``,
    ``augment``, ``tta``, ...) go to the classifier and into the row's
    description.
    """
    from skt.finetune import FineTuneClassifier

    estimator = FineTuneClassifier(backbone, image_size=image_size, max_iter=max_iter,
                                   freeze=freeze, batch_size=batch_size,
                                   learning_rate_init=learning_rate_init, num_workers=None,
                                   random_state=random_state, verbose=verbose, **params)
    epochs = "epoch" if max_iter == 1 else "epochs"
    extra = "".join(f", {name}={value!r}" for name, value in sorted(params.items()))
    return Row(f"{_short(backbone)} fine-tuned ({max_iter} {epochs}, {image_size} px)", estimator,
               group="fine-tuned",
               description=(f"FineTuneClassifier({backbone!r}, image_size={image_size}, "
                            f"max_iter={max_iter}, freeze={freeze!r}, batch_size={batch_size}, "
                            f"learning_rate_init={learning_rate_init}{extra}) with its defaults "
                            "otherwise (AdamW, cosine schedule, backbone at 0.1x the head's "
                            "learning rate); no search"),
               info={"backbone": backbone, "image_size": image_size, "max_iter": max_iter,
                     "freeze": freeze, **params})


def imagenet_top1(backbone: str) -> float | None:
    """Published ImageNet top-1 accuracy (%) of a backbone's default weights, if known.

    Examples
    --------
    >>> from skt.bench import imagenet_top1
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
