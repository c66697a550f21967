"""Side-by-side comparisons of image classifiers, measured in one run: the harness and the demo.

Not imported by ``import skt``; it needs the ``bench`` extra
(``pip install 'skt[bench]'``: matplotlib, scipy, threadpoolctl, the ELPV data).

The engine behind ``skt demo`` and the scripts in ``benchmarks/``: given
images, labels and a protocol (one stratified train/test split, or K-fold
cross-validation), it fits each :class:`Row` on the training images, scores
it on the held-out ones and reports accuracy, balanced accuracy, macro-F1,
ROC-AUC and wall-clock fit and predict seconds. :func:`run_learning_curve`
draws the learning curve instead: held-out accuracy against the number of
labelled training images, over several random training subsets per size.

Rows read an :class:`Input`: the images themselves, or something computed
once from all of them and shared by several rows, such as downsampled raw
pixels (:func:`pixel_input`) or a warm feature cache (:func:`feature_input`).
The time an input takes is charged to every row that reads it, per image, so
fit and predict seconds stay comparable between rows.

:func:`write_results` saves ``results.json`` (every metric, timing, best
hyper-parameter, the data set, split sizes, seed and machine),
``results.md`` (a Markdown table) and ``results.png`` (a bar chart; needs
matplotlib, from ``pip install 'skt[bench]'``); :func:`write_learning_curve`
saves ``curve.json``, ``curve.md`` and ``curve.png`` likewise.

Examples
--------
>>> import numpy as np
>>> from sklearn.dummy import DummyClassifier
>>> from sklearn.linear_model import LogisticRegression
>>> from skt.bench import Row, pixel_input, run_comparison
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

from skt.bench._curve import plot_learning_curve, run_learning_curve, write_learning_curve
from skt.bench._inputs import Input, downsample, feature_input, pixel_input
from skt.bench._machine import HEAD_BLAS_THREADS, format_machine, machine_info
from skt.bench._report import METRICS, format_table, markdown_table, plot_results, write_results
from skt.bench._rows import (
    Reference,
    Row,
    compare_with_imagenet,
    feature_rows,
    finetune_row,
    format_imagenet_comparison,
    imagenet_top1,
    majority_row,
    pixel_rows,
)
from skt.bench._run import run_comparison, score_predictions

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
    "plot_learning_curve",
    "plot_results",
    "run_comparison",
    "run_learning_curve",
    "score_predictions",
    "write_learning_curve",
    "write_results",
]
