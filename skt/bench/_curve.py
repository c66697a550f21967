"""Learning curves: held-out accuracy against the number of labelled training images."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import clone
from threadpoolctl import threadpool_limits

from skt._utils import expand_path
from skt.bench._inputs import Input
from skt.bench._machine import HEAD_BLAS_THREADS, format_machine, machine_info
from skt.bench._rows import Row
from skt.bench._run import _check_inputs, _jsonable, _prepare, _say, _splits, _take

__all__ = ["plot_learning_curve", "run_learning_curve", "write_learning_curve"]


def _resolve_sizes(train_sizes: Sequence[int | str], n_train: int, n_classes: int,
                   verbose: int) -> list[int]:
    if len(train_sizes) == 0:
        raise ValueError("train_sizes is empty; pass numbers of images, e.g. [50, 100, 'all'].")
    sizes = set()
    for size in train_sizes:
        if size == "all":
            sizes.add(n_train)
            continue
        if isinstance(size, bool) or not isinstance(size, int | np.integer):
            raise ValueError(f"train_sizes holds {size!r}; use whole numbers of images or 'all'.")
        if size < n_classes:
            raise ValueError(f"A training subset of {size} images cannot hold one image of "
                             f"each of the {n_classes} classes; use at least {n_classes}.")
        if size > n_train:
            _say(verbose, f"Size {size} is more than the {n_train} training images: "
                          f"using all {n_train}.")
        sizes.add(min(int(size), n_train))
    return sorted(sizes)


def _stratified_subset(train: np.ndarray, y: np.ndarray, size: int,
                       rng: np.random.Generator) -> np.ndarray:
    # Not sklearn's learning_curve(cv=[(train, test)] * n_seeds, shuffle=True):
    # its subsets are prefixes of one random permutation of the training part
    # per repeat, not stratified, so a small one may miss a class (the fit then
    # fails) and class shares vary between repeats, which adds to the spread.
    # It also scores every fit on its own training subset (return_train_score
    # is fixed to True), one more prediction pass over up to all training
    # images that fine-tuning pays in full, and it reports no progress per
    # point. Here every class gets one image and the rest is shared in
    # proportion to the class sizes (largest remainder).
    if size >= len(train):
        return train
    classes, codes = np.unique(y[train], return_inverse=True)
    spare = np.bincount(codes) - 1
    wanted = spare * (size - len(classes)) / spare.sum()
    quota = np.floor(wanted).astype(int)
    largest = np.argsort(quota - wanted, kind="stable")[:size - len(classes) - quota.sum()]
    quota[largest] += 1
    chosen = [rng.choice(train[codes == k], quota[k] + 1, replace=False)
              for k in range(len(classes))]
    return np.sort(np.concatenate(chosen))


def _reseeded(estimator, repeat: int):
    estimator = clone(estimator)
    seed = estimator.get_params(deep=False).get("random_state")
    if isinstance(seed, int | np.integer) and not isinstance(seed, bool):
        estimator.set_params(random_state=int(seed) + repeat)
    return estimator


def _fit_and_score(estimator, X, y, subset, test) -> tuple[float, float]:
    with threadpool_limits(HEAD_BLAS_THREADS, user_api="blas"):
        start = time.perf_counter()
        estimator.fit(_take(X, subset), y[subset])
        seconds = time.perf_counter() - start
        accuracy = float(np.mean(estimator.predict(_take(X, test)) == y[test]))
    return accuracy, seconds


def _point(size: int, accuracies: list[float], fits: list[float], input_share: float,
           estimators: list) -> dict[str, Any]:
    return {
        "size": size,
        "accuracies": accuracies,
        "mean": float(np.mean(accuracies)),
        "std": float(np.std(accuracies)),
        "min": float(np.min(accuracies)),
        "max": float(np.max(accuracies)),
        "fit_seconds": float(np.mean(fits)) + input_share * size,
        "input_fit_seconds": input_share * size,
        "fit_seconds_per_seed": [seconds + input_share * size for seconds in fits],
        "random_states": [e.get_params(deep=False).get("random_state") for e in estimators],
        "best_params": [getattr(e, "best_params_", None) for e in estimators],
    }


def run_learning_curve(images, y, methods: Sequence[Row], *, train_sizes: Sequence[int | str],
                       n_seeds: int, inputs: Sequence[Input] = (), test_size: float = 0.25,
                       stratify=None, random_state: int | None = 0,
                       dataset: dict | None = None, title: str = "Learning curve",
                       verbose: int = 1) -> dict[str, Any]:
    """Held-out accuracy of each method against the number of labelled training images.

    The images are split once into a training part and a test part: the
    stratified split :func:`run_comparison` makes for the same ``test_size``,
    ``stratify`` and ``random_state``. For each size and each of ``n_seeds``
    repeats, a random subset of that many images is drawn from the training
    part, stratified by class with at least one image of every class; every
    method is fitted on the same subset and scored on the whole test part.
    A subset depends only on the seed, its size and the repeat, so adding a
    size leaves the others' subsets as they were.

    Repeat ``k`` also adds ``k`` to the ``random_state`` of a method's
    estimator, when it is an int (e.g. a :class:`skt.FineTuneClassifier`'s
    initialisation and shuffling), so the spread includes the method's own
    randomness: at the full training part, where every repeat sees the same
    images, it is the only source. Nested parameters (a pipeline's steps, a
    search's estimator) are left as they are.

    Parameters
    ----------
    images : images
        Anything :mod:`skt.images` accepts (paths, arrays, ...).
    y : array-like of shape (n_images,)
        Class labels.
    methods : sequence of Row
        Run in order; each is cloned for every fit and reads its ``input``.
    train_sizes : sequence of int or "all"
        Numbers of training images. ``"all"`` and sizes larger than the
        training part mean the whole training part; duplicates are merged.
    n_seeds : int
        Repeats per size, each with its own random subset.
    inputs : sequence of Input, default=()
        Computed once from all images before the first method that reads
        them; their time is charged to each fit per training image, as in
        :func:`run_comparison`.
    test_size : float, default=0.25
        Held-out share of the split.
    stratify : array-like, optional
        Labels to stratify the split on; default ``y``. Subsets are
        stratified by ``y``.
    random_state : int or None, default=0
        Seeds the split and the subsets.
    dataset : dict, optional
        Description of the data set, stored in the results.
    title : str, default="Learning curve"
        Heading of the table and chart.
    verbose : int, default=1
        0 prints nothing; 1 prints the machine, the split, a line per point
        and the table.

    Returns
    -------
    results : dict
        JSON-ready: ``title``, ``dataset``, ``protocol`` (split sizes, seed,
        repeats, ``sizes`` used, ``majority_accuracy``: the test accuracy of
        always predicting the training part's most frequent class),
        ``machine``, ``inputs`` (seconds each), ``test_indices``, ``subsets``
        (per size, the training indices of each repeat), ``methods`` (per
        method its name, group, description and
        ``points``: per size ``accuracies`` (one per repeat), their ``mean``,
        ``std`` (population), ``min`` and ``max``, the mean ``fit_seconds``
        including the input's share, ``random_states`` and ``best_params``)
        and ``wall_seconds``.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skt.bench import Row, pixel_input, run_learning_curve
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(0, 100, (40, 4, 4), dtype=np.uint8)
    >>> y = np.arange(40) % 2
    >>> X[y == 1] += 100  # class 1 is brighter
    >>> rows = [Row("pixels + logreg", LogisticRegression(), input="pixels")]
    >>> results = run_learning_curve(X, y, rows, train_sizes=[4, "all"], n_seeds=3,
    ...                              inputs=[pixel_input(size=None)], verbose=0)
    >>> results["protocol"]["sizes"]
    [4, 30]
    >>> [point["mean"] for point in results["methods"][0]["points"]]
    [1.0, 1.0]
    """
    start = time.perf_counter()
    machine = machine_info()
    _say(verbose, format_machine(machine))
    images, y, by_name = _check_inputs(images, y, methods, inputs, "Methods")
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int | np.integer) or n_seeds < 1:
        raise ValueError(f"n_seeds={n_seeds!r}; use a whole number of repeats, at least 1.")
    stratify = y if stratify is None else np.asarray(stratify)
    ((train, test),) = _splits(y, stratify, test_size, None, random_state, None)
    sizes = _resolve_sizes(train_sizes, len(train), len(np.unique(y[train])), verbose)
    entropy = np.random.SeedSequence(random_state).entropy
    subsets = {size: [_stratified_subset(train, y, size,
                                         np.random.default_rng([entropy, size, repeat]))
                      for repeat in range(n_seeds)] for size in sizes}
    _say(verbose, f"Protocol: one stratified split of {len(images)} images, {len(train)} for "
                  f"training and {len(test)} for testing (seed {random_state}); {n_seeds} "
                  f"random stratified training subsets of each of {sizes} images.")

    prepared: dict[str, Any] = {"images": images}
    input_log: dict[str, dict] = {}
    curves = []
    for number, row in enumerate(methods, start=1):
        _prepare(row, by_name, prepared, input_log, images, verbose)
        _say(verbose, f"[{number}/{len(methods)}] {row.name}")
        share = input_log.get(row.input, {}).get("seconds", 0.0) / len(images)
        points = []
        for size in sizes:
            estimators = [_reseeded(row.estimator, repeat) for repeat in range(n_seeds)]
            scores = [_fit_and_score(estimator, prepared[row.input], y, subset, test)
                      for estimator, subset in zip(estimators, subsets[size], strict=True)]
            point = _point(size, [a for a, _ in scores], [s for _, s in scores], share,
                           estimators)
            points.append(point)
            _say(verbose, f"      {size:>6} images: accuracy {point['mean']:.3f} ± "
                          f"{point['std']:.3f} (min {point['min']:.3f}, max "
                          f"{point['max']:.3f}), fit {point['fit_seconds']:.1f} s")
        curves.append({"name": row.name, "group": row.group, "input": row.input,
                       "description": row.description, **row.info, "points": points})
    results = _jsonable({
        "title": title,
        "dataset": dataset or {},
        "protocol": {"kind": "learning curve", "test_size": test_size, "n_train": len(train),
                     "n_test": len(test), "random_state": random_state, "n_seeds": n_seeds,
                     "requested_sizes": list(train_sizes), "sizes": sizes,
                     "majority_accuracy": _majority_accuracy(y[train], y[test])},
        "machine": machine,
        "inputs": input_log,
        "test_indices": test.tolist(),
        "subsets": {str(size): [s.tolist() for s in subsets[size]] for size in sizes},
        "methods": curves,
        "wall_seconds": time.perf_counter() - start,
    })
    _say(verbose, "\n" + _table(results))
    return results


def _majority_accuracy(y_train: np.ndarray, y_test: np.ndarray) -> float:
    labels, counts = np.unique(y_train, return_counts=True)
    return float(np.mean(y_test == labels[counts.argmax()]))


def _size_label(size: int, protocol: dict) -> str:
    return f"{size} (all)" if size == protocol["n_train"] else str(size)


def _table(results: dict) -> str:
    """Markdown table, rows = sizes, columns = methods, padded to read as plain text too."""
    protocol = results["protocol"]
    header = ["training images", *(method["name"] for method in results["methods"])]
    lines = [[_size_label(size, protocol)] for size in protocol["sizes"]]
    for method in results["methods"]:
        for line, point in zip(lines, method["points"], strict=True):
            line.append(f"{point['mean']:.3f} ± {point['std']:.3f}")
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def render(cells):
        return "| " + " | ".join(cell.rjust(width) for cell, width in
                                 zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (width + 1) + ":" for width in widths) + "|"
    return "\n".join([render(header), rule, *(render(line) for line in lines)])


def _notes(results: dict) -> list[str]:
    protocol = results["protocol"]
    notes = [f"Accuracy on the same {protocol['n_test']} held-out images (one stratified "
             f"split, seed {protocol['random_state']}), mean ± standard deviation over "
             f"{protocol['n_seeds']} random training subsets of each size, stratified by class "
             f"and drawn from the {protocol['n_train']} training images; min and max are in "
             "curve.json and are the chart's bands. Always predicting the most frequent "
             f"training class scores {protocol['majority_accuracy']:.3f}."]
    dataset = results["dataset"]
    if dataset.get("name"):
        details = [dataset.get("note"), dataset.get("licence") and f"licence {dataset['licence']}"]
        notes.append(f"Data: {dataset['name']}" + "".join(f"; {d}" for d in details if d) + ".")
    for method in results["methods"]:
        if method["description"]:
            notes.append(f"{method['name']}: {method['description']}.")
    shared = [f"{name} ({log['description']}, {log['seconds']:.1f} s for all images)"
              for name, log in results["inputs"].items()]
    if shared:
        notes.append("Inputs computed once for all images: " + "; ".join(shared) + ".")
    notes.append(format_machine(results["machine"]) + ".")
    return notes


def plot_learning_curve(results: dict, path: str | os.PathLike) -> Path:
    """Accuracy against training images (log scale): a line and a min-max band per method.

    A dashed line marks the accuracy of always predicting the most frequent
    training class.

    Needs matplotlib (``pip install 'skt[bench]'``); no pyplot state is touched.

    Parameters
    ----------
    results : dict
        From :func:`run_learning_curve`.
    path : str or path
        The image file to write; its suffix picks the format (e.g. ``.png``).

    Returns
    -------
    path : Path

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from skt.bench import plot_learning_curve
    >>> point = {"size": 10, "mean": 0.8, "min": 0.7, "max": 0.9}
    >>> results = {"title": "Toy", "protocol": {"n_test": 20, "n_seeds": 3, "n_train": 40},
    ...            "methods": [{"name": "m", "points": [point, {**point, "size": 40}]}]}
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     plot_learning_curve(results, Path(folder) / "curve.png").stat().st_size > 0
    True
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("The chart needs matplotlib: pip install matplotlib "
                          "(or pip install 'skt[bench]').") from exc
    protocol = results["protocol"]
    figure = Figure(figsize=(7.5, 5.0), layout="constrained")
    axes = figure.add_subplot()
    sizes = sorted({p["size"] for method in results["methods"] for p in method["points"]})
    for method in results["methods"]:
        x = [p["size"] for p in method["points"]]
        (line,) = axes.plot(x, [p["mean"] for p in method["points"]], marker="o",
                            label=method["name"])
        axes.fill_between(x, [p["min"] for p in method["points"]],
                          [p["max"] for p in method["points"]], color=line.get_color(),
                          alpha=0.2, linewidth=0)
    majority = protocol.get("majority_accuracy")
    if majority is not None:
        axes.axhline(majority, color="0.4", linestyle="--", linewidth=1,
                     label=f"majority class ({majority:.3f})")
    axes.set_xscale("log")
    axes.set_xticks(sizes, [_size_label(size, protocol) for size in sizes])
    axes.set_xticks([], minor=True)
    axes.set_xlabel("labelled training images (log scale)")
    axes.set_ylabel(f"accuracy on {protocol['n_test']} held-out images")
    axes.grid(alpha=0.3)
    axes.set_title(f"{results['title']}\nmean over {protocol['n_seeds']} random training "
                   "subsets per size; band: min to max", fontsize=10)
    axes.legend(fontsize=8, loc="lower right")
    path = expand_path(path)
    figure.savefig(path, dpi=120)
    return path


def write_learning_curve(results: dict, output: str | os.PathLike) -> dict[str, Path]:
    """Write ``curve.json``, ``curve.md`` (sizes by methods, "mean ± std") and ``curve.png``.

    Parameters
    ----------
    results : dict
        From :func:`run_learning_curve`.
    output : str or path
        Folder, created if missing.

    Returns
    -------
    paths : dict
        ``{"json": path, "markdown": path, "chart": path}``.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from sklearn.dummy import DummyClassifier
    >>> from skt.bench import Row, run_learning_curve, write_learning_curve
    >>> X = np.zeros((20, 4, 4), dtype=np.uint8)
    >>> results = run_learning_curve(X, np.arange(20) % 2, [Row("majority", DummyClassifier())],
    ...                              train_sizes=[4], n_seeds=2, verbose=0)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     paths = write_learning_curve(results, folder)
    ...     print(paths["markdown"].read_text().splitlines()[2])
    | training images | majority |
    """
    output = expand_path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "curve.json", "markdown": output / "curve.md"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    notes = "".join(f"\n{note}\n" for note in _notes(results))
    paths["markdown"].write_text(f"### {results['title']}\n\n{_table(results)}\n{notes}",
                                 encoding="utf-8")
    paths["chart"] = plot_learning_curve(results, output / "curve.png")
    return paths
