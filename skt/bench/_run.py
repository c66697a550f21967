"""Fitting and scoring every row on one split or on K folds, in one run."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, clone
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, train_test_split
from threadpoolctl import threadpool_limits

from skt.bench._inputs import Input
from skt.bench._machine import HEAD_BLAS_THREADS, format_machine, machine_info
from skt.bench._report import METRICS, _cell, _protocol_text, format_table
from skt.bench._rows import Reference, Row
from skt.images import as_image_list

__all__ = ["run_comparison", "score_predictions"]

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
    >>> from skt.bench import score_predictions
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


def _check_inputs(images, y, rows: Sequence[Row], inputs: Sequence[Input],
                  what: str) -> tuple[list, np.ndarray, dict[str, Input]]:
    """Validated images and labels, and the inputs by name; every row's input must be there."""
    images = as_image_list(images)
    y = np.asarray(y)
    if len(y) != len(images):
        raise ValueError(f"{len(images)} images but {len(y)} labels; pass one label per image.")
    by_name = {item.name: item for item in inputs}
    missing = {row.input for row in rows} - set(by_name) - {"images"}
    if missing:
        raise ValueError(f"{what} read inputs {sorted(missing)} that are not in inputs "
                         f"({sorted(by_name)}); add them or fix Row.input.")
    return images, y, by_name


def _prepare(row: Row, inputs: dict[str, Input], prepared: dict, log: dict, images,
             verbose: int) -> None:
    """Compute ``row``'s input once, into ``prepared``, and log its time."""
    if row.input in prepared:
        return
    item = inputs[row.input]
    _say(verbose, f"Preparing {item.name}: {item.description} for {len(images)} images")
    begin = time.perf_counter()
    prepared[row.input], note = item.prepare(images)
    log[row.input] = {"description": note, "seconds": time.perf_counter() - begin}
    _say(verbose, f"  {note}: {log[row.input]['seconds']:.1f} s")


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
    images, y, by_name = _check_inputs(images, y, rows, inputs, "Rows")
    stratify = y if stratify is None else np.asarray(stratify)
    splits = _splits(y, stratify, test_size, cv, random_state, split)
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
        _prepare(row, by_name, prepared, input_log, images, verbose)
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


def _best_text(best: list) -> str:
    if len(best) != 1 or not best[0]:
        return ""
    return "; best " + ", ".join(f"{k.split('__')[-1]}={v}" for k, v in best[0].items())
