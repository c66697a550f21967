"""Transferability: how well a backbone's features suit a labelled target task, before training.

Each score needs one forward pass over the target images and no head: rank
backbones, layers or poolings by it, then train only the best. Higher is
better for all four.

- :func:`logme` (You et al., 2021): the maximised evidence of a Bayesian
  linear model from the features to each one-hot label column.
- :func:`hscore` (Bao et al., 2019): how much of the features' variance the
  class means explain.
- :func:`leep` (Nguyen et al., 2020): the log-likelihood of the target labels
  under the source classifier's probabilities and the empirical conditional
  of target labels given source labels.
- :func:`nce` (Tran et al., 2019): the negative conditional entropy of the
  target labels given the source classifier's hard labels.

:func:`make_transferability_scorer` turns any of them into a scikit-learn
scorer for ``GridSearchCV(FeatureExtractor(cache=...), {...}, scoring=...)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["hscore", "leep", "logme", "make_transferability_scorer", "nce", "rank_backbones"]


def _labels(y, n: int, name: str = "y") -> tuple[np.ndarray, int]:
    """``y`` encoded as 0..K-1, and K; at least two classes, one label per row."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{name} must hold one label per row: {n} rows, but {name} has shape "
                         f"{y.shape}.")
    classes, encoded = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"{name} has a single class ({classes[0]!r}); a transferability score "
                         "compares classes and needs at least two.")
    return encoded, len(classes)


def _matrix(values, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or len(values) < 2:
        raise ValueError(f"{name} must be a 2-D array with one row per image (at least 2); "
                         f"it has shape {values.shape}.")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} holds NaN or infinite values (skipped images?); drop those "
                         "rows and their labels first.")
    return values


def _log_evidence(sigma: np.ndarray, projected: np.ndarray, residual: float, n: int, d: int,
                  max_iter: int, tol: float) -> float:
    """Maximised log evidence of ``target = features @ w + noise`` (one label column).

    ``sigma`` are the squared singular values of the features, ``projected``
    the target in their left singular vectors and ``residual`` the squared
    norm of the target outside their span. Prior ``w ~ N(0, I / alpha)``,
    noise ``N(0, 1 / beta)``; MacKay's fixed point on ``alpha`` and ``beta``.
    """
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        ratio = alpha / beta
        gamma = np.sum(sigma / (sigma + ratio))  # well-determined directions
        mean_norm = np.sum(sigma * projected**2 / (sigma + ratio) ** 2)  # |m|^2
        misfit = np.sum(projected**2 * (ratio / (sigma + ratio)) ** 2) + residual
        alpha, beta = gamma / max(mean_norm, 1e-12), (n - gamma) / max(misfit, 1e-12)
        if abs(alpha / beta - ratio) <= tol * ratio:
            break
    ratio = alpha / beta
    mean_norm = np.sum(sigma * projected**2 / (sigma + ratio) ** 2)
    misfit = np.sum(projected**2 * (ratio / (sigma + ratio)) ** 2) + residual
    # log|A| for A = alpha I + beta F^T F: the d - r directions outside the span give alpha
    log_det = np.sum(np.log(alpha + beta * sigma)) + (d - len(sigma)) * np.log(alpha)
    return (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
            - beta / 2 * misfit - alpha / 2 * mean_norm - log_det / 2)


def logme(features, y, *, max_iter: int = 100, tol: float = 1e-4) -> float:
    r"""LogME: the average log maximum evidence of the features for the labels.

    For each class :math:`k`, the one-hot column :math:`t_k` is modelled as
    :math:`t_k = F w + \varepsilon` with :math:`w \sim N(0, \alpha^{-1} I)`
    and :math:`\varepsilon \sim N(0, \beta^{-1} I)`. The evidence
    :math:`p(t_k \mid F, \alpha, \beta) = N(t_k; 0, \beta^{-1} I + \alpha^{-1} F F^\top)`
    is maximised over :math:`\alpha, \beta` by MacKay's fixed-point iteration
    (computed from one SVD of :math:`F`); LogME is
    :math:`\frac{1}{K n} \sum_k \log p(t_k \mid F, \alpha_k^*, \beta_k^*)`.

    You, Liu, Wang and Long, "LogME: Practical Assessment of Pre-trained
    Models for Transfer Learning", ICML 2021.

    Parameters
    ----------
    features : array-like of shape (n_samples, n_features)
    y : array-like of shape (n_samples,)
        Class labels, at least two classes.
    max_iter : int, default=100
        Fixed-point iterations per class at most.
    tol : float, default=1e-4
        Stop when ``alpha / beta`` changes by less than this fraction.

    Returns
    -------
    score : float
        Higher is better; comparable between feature sets on the same labels.

    Examples
    --------
    >>> import numpy as np
    >>> from skt.transferability import logme
    >>> rng = np.random.default_rng(0)
    >>> y = np.repeat([0, 1], 50)
    >>> separable = rng.normal(size=(100, 8)) + 3 * y[:, None]
    >>> bool(logme(separable, y) > logme(separable, rng.permutation(y)))
    True
    """
    F = _matrix(features, "features")
    n, d = F.shape
    encoded, n_classes = _labels(y, n)
    u, s, _ = np.linalg.svd(F, full_matrices=False)
    keep = s > s.max() * max(n, d) * np.finfo(np.float64).eps
    u, sigma = u[:, keep], s[keep] ** 2
    evidence = 0.0
    for k in range(n_classes):
        target = (encoded == k).astype(np.float64)
        projected = u.T @ target
        residual = max(float(target @ target - projected @ projected), 0.0)
        evidence += _log_evidence(sigma, projected, residual, n, d, max_iter, tol)
    return float(evidence / (n_classes * n))


def hscore(features, y) -> float:
    r"""H-score: :math:`\mathrm{tr}(\mathrm{cov}(f)^{-1}\,\mathrm{cov}(E[f \mid y]))`.

    The share of the features' covariance that the class-conditional means
    explain, summed over directions whitened by the features' own covariance
    (a pseudo-inverse where it is singular).

    Bao, Li, Huang, Cui, Zhao and Tong, "An Information-Theoretic Approach to
    Transferability in Task Transfer Learning", ICIP 2019.

    Parameters
    ----------
    features : array-like of shape (n_samples, n_features)
    y : array-like of shape (n_samples,)

    Returns
    -------
    score : float
        Higher is better; at most the number of classes minus one. With no
        more images than feature dimensions the covariance is singular, the
        class means explain everything and the score sits at that maximum
        for any features: use :func:`logme` there, or reduce the dimension
        first (PCA).

    Examples
    --------
    >>> import numpy as np
    >>> from skt.transferability import hscore
    >>> features = np.array([[0.0], [0.2], [1.0], [1.2]])
    >>> round(hscore(features, [0, 0, 1, 1]), 3)
    0.962
    """
    F = _matrix(features, "features")
    encoded, n_classes = _labels(y, len(F))
    F = F - F.mean(axis=0)
    means = np.stack([F[encoded == k].mean(axis=0) for k in range(n_classes)])
    explained = means[encoded]  # each row replaced by its class mean
    cov_features = F.T @ F / len(F)
    cov_explained = explained.T @ explained / len(F)
    return float(np.trace(np.linalg.pinv(cov_features, hermitian=True) @ cov_explained))


def leep(source_probabilities, y) -> float:
    r"""LEEP: the log expected empirical prediction.

    With :math:`\theta_i(z)` the source classifier's probability of source
    class :math:`z` for image :math:`i`, the empirical joint
    :math:`\hat P(y, z) = \frac{1}{n}\sum_{i: y_i = y} \theta_i(z)` gives
    :math:`\hat P(y \mid z)`, and
    :math:`\mathrm{LEEP} = \frac{1}{n} \sum_i \log \sum_z \hat P(y_i \mid z)\,\theta_i(z)`.

    Nguyen, Hassner, Seeger and Archambeau, "LEEP: A New Measure to Evaluate
    Transferability of Learned Representations", ICML 2020.

    Parameters
    ----------
    source_probabilities : array-like of shape (n_samples, n_source_classes)
        Rows of probabilities (each sums to 1), e.g. the softmax of an
        ImageNet classifier's logits.
    y : array-like of shape (n_samples,)

    Returns
    -------
    score : float
        At most 0; higher is better.

    Examples
    --------
    >>> from skt.transferability import leep
    >>> leep([[1.0, 0.0], [0.0, 1.0]], ["cat", "dog"])
    0.0
    """
    theta = _matrix(source_probabilities, "source_probabilities")
    if np.any(theta < 0) or not np.allclose(theta.sum(axis=1), 1, atol=1e-4):
        raise ValueError("source_probabilities must be rows of probabilities summing to 1 "
                         "(apply a softmax to logits first).")
    encoded, n_classes = _labels(y, len(theta))
    joint = np.zeros((n_classes, theta.shape[1]))
    np.add.at(joint, encoded, theta)
    joint /= len(theta)
    conditional = joint / np.maximum(joint.sum(axis=0, keepdims=True), np.finfo(float).tiny)
    expected = np.sum(theta * conditional[encoded], axis=1)
    return float(np.mean(np.log(np.maximum(expected, np.finfo(float).tiny))))


def nce(source_labels, y) -> float:
    r"""NCE: the negative conditional entropy :math:`-H(Y \mid Z)` of target given source labels.

    :math:`-H(Y \mid Z) = \sum_{y, z} \hat P(y, z) \log \hat P(y \mid z)`,
    with :math:`\hat P` the empirical joint distribution of the source
    classifier's hard label :math:`z_i` (its argmax) and the target label
    :math:`y_i`.

    Tran, Nguyen and Hassner, "Transferability and Hardness of Supervised
    Classification Tasks", ICCV 2019.

    Parameters
    ----------
    source_labels : array-like of shape (n_samples,)
        The source classifier's predicted class of each image.
    y : array-like of shape (n_samples,)

    Returns
    -------
    score : float
        At most 0 (target labels a function of the source labels); higher is better.

    Examples
    --------
    >>> from skt.transferability import nce
    >>> round(nce([0, 0, 1, 1], ["a", "b", "a", "b"]), 4)  # -log 2: no information
    -0.6931
    """
    z = np.asarray(source_labels)
    encoded, _ = _labels(y, len(z))
    if z.ndim != 1:
        raise ValueError(f"source_labels must be 1-D, one predicted class per image; it has "
                         f"shape {z.shape}. Pass the argmax of the source probabilities.")
    _, z = np.unique(z, return_inverse=True)
    joint = np.zeros((encoded.max() + 1, z.max() + 1))
    np.add.at(joint, (encoded, z), 1.0)
    joint /= len(z)
    conditional = joint / joint.sum(axis=0, keepdims=True)
    present = joint > 0
    return float(np.sum(joint[present] * np.log(conditional[present])))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


_FROM_OUTPUT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "logme": lambda features: features,
    "hscore": lambda features: features,
    "leep": _softmax,
    "nce": lambda logits: np.argmax(logits, axis=1),
}
_METRICS = {"logme": logme, "hscore": hscore, "leep": leep, "nce": nce}


def make_transferability_scorer(metric: str = "logme") -> Callable:
    """A scikit-learn scorer that scores a fitted transformer's output on ``(X, y)``.

    ``scorer(estimator, X, y)`` is ``metric(estimator.transform(X), y)``: with
    a :class:`~skt.FeatureExtractor` as the estimator, ``GridSearchCV`` ranks
    backbones, layers and poolings with no head, each configuration costing
    one extraction (with ``cache=``, folds reuse it). For ``"leep"`` and
    ``"nce"`` the extractor's layer must be the network's logits (e.g.
    ``layers="classifier.1"`` for EfficientNet-Lite, ``"fc"`` for a ResNet):
    the scorer takes their softmax or their argmax. A transformer is not a
    classifier, so ``GridSearchCV`` splits it with plain ``KFold``: pass
    ``cv=StratifiedKFold(...)`` so that every fold holds every class.

    Parameters
    ----------
    metric : {"logme", "hscore", "leep", "nce"}, default="logme"

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y) -> float``, higher is better.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.model_selection import GridSearchCV, StratifiedKFold
    >>> from skt import FeatureExtractor, make_transferability_scorer
    >>> X = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    >>> y = np.repeat([0, 1], 6)
    >>> search = GridSearchCV(
    ...     FeatureExtractor("resnet18", weights=None, image_size=32, random_state=0),
    ...     {"layers": ["layer2", "layer3"]}, cv=StratifiedKFold(2),
    ...     scoring=make_transferability_scorer("logme")).fit(X, y)
    >>> search.best_params_["layers"] in ("layer2", "layer3")
    True
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {sorted(_METRICS)}; got {metric!r}.")
    score, prepare = _METRICS[metric], _FROM_OUTPUT[metric]

    def scorer(estimator, X, y) -> float:
        return score(prepare(np.asarray(estimator.transform(X), dtype=np.float64)), y)

    scorer.__name__ = f"{metric}_scorer"
    scorer.__qualname__ = scorer.__name__
    return scorer


def _label(extractor) -> str:
    label = extractor._label() if hasattr(extractor, "_label") else str(extractor.backbone)
    return label if extractor.weights is not None else f"{label} (random init)"


def rank_backbones(X, y, backbones: Sequence[Any], *, layers: Sequence[str | None] | None = None,
                   metric: str = "logme", cache: Any = None, image_size: int | None = None,
                   batch_size: int = 32):
    """Rank backbones (and layers) by a transferability score on labelled images, best first.

    Each backbone and layer costs one forward pass over ``X`` (none when the
    feature ``cache`` has it) and no training.

    Parameters
    ----------
    X : images
        Anything :class:`~skt.FeatureExtractor` takes.
    y : array-like of shape (n_samples,)
    backbones : sequence of str or FeatureExtractor
        Backbone names, or configured extractors (e.g.
        ``FeatureExtractor("resnet18", weights=None, random_state=0)``, a
        random-init control); an extractor's own ``cache``, ``image_size``
        and ``batch_size`` stand.
    layers : sequence of str or None, optional
        Layers to try in every backbone (None: the penultimate features; a
        name a backbone lacks gives that row an error). Default: each
        backbone's own ``layers``.
    metric : {"logme", "hscore"}, default="logme"
    cache : str, path or None, default=None
        Feature cache for backbones given by name.
    image_size : int, optional
        Crop size for backbones given by name (default: the weights').
    batch_size : int, default=32
        For backbones given by name.

    Returns
    -------
    table : pandas.DataFrame, or list of dict without pandas
        One row per backbone and layer: ``backbone``, ``layer``, ``score``,
        ``seconds`` and ``error`` (why the row has no score: weights that are
        not on this machine, an unknown layer; None in the list, missing in
        the DataFrame when the row has a score), best score first, rows with
        errors last.

    Examples
    --------
    >>> import numpy as np
    >>> from skt import FeatureExtractor
    >>> from skt.transferability import rank_backbones
    >>> X = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    >>> table = rank_backbones(X, np.repeat([0, 1], 8), [
    ...     FeatureExtractor("resnet18", weights=None, image_size=32, random_state=0),
    ...     FeatureExtractor("mobilenet_v3_small", weights=None, image_size=32, random_state=0),
    ... ])
    >>> len(table), sorted(table.columns)
    (2, ['backbone', 'error', 'layer', 'score', 'seconds'])
    """
    from sklearn.base import clone

    from skt.extractor import FeatureExtractor

    if metric not in ("logme", "hscore"):
        raise ValueError(f"metric must be 'logme' or 'hscore' (scores of features); got "
                         f"{metric!r}. LEEP and NCE need a source classifier's output: use "
                         "make_transferability_scorer with the logits layer.")
    score = _METRICS[metric]
    if hasattr(X, "__len__"):
        _labels(y, len(X))  # a bad y fails once, here, not in every row
    rows = []
    for entry in backbones:
        base = (entry if isinstance(entry, FeatureExtractor) else FeatureExtractor(
            entry, cache=cache, image_size=image_size, batch_size=batch_size))
        for layer in ([base.layers] if layers is None else list(layers)):
            extractor = clone(base).set_params(layers=layer)
            row = {"backbone": _label(extractor), "layer": layer or "pre_logits",
                   "score": float("nan"), "seconds": 0.0, "error": None}
            start = time.perf_counter()
            try:
                row["score"] = score(extractor.fit(X).transform(X), y)
            except (OSError, ValueError, TypeError, RuntimeError) as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
    rows.sort(key=lambda row: (row["error"] is not None, -np.nan_to_num(row["score"],
                                                                        nan=-np.inf)))
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows, columns=["backbone", "layer", "score", "seconds", "error"])
