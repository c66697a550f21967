"""A GridSearchCV over a FeatureExtractor pipeline: no cache, cold cache, warm cache.

The search is the one the feature cache was built for::

    GridSearchCV(Pipeline(FeatureExtractor(cache=...), LogisticRegression()),
                 {"logisticregression__C": [0.01, 0.1, 1, 10, 100, 1000]}, cv=5)

on a stratified subset of the ELPV solar-cell images (``elpv-dataset``). It is
timed without a cache, with an empty (cold) cache and with the cache the cold
run filled (warm), next to a reference measured in the same run: one
``FeatureExtractor.transform`` over all images plus the same search on the
precomputed features. Expected: the cold-cache search costs at most 1.3 x the
reference, and the warm-cache search is at least 20 x faster than the
uncached one. ::

    python benchmarks/bench_gridsearch.py --images 300 --image-size 224

Without a cache each of the 31 fits (6 values x 5 folds, plus the refit) runs
the backbone over every image again, so the uncached search takes about three
minutes on two cores at Lite0's native 224 px. The cache lives in a temporary
folder, deleted at exit. A warm cache still reads one file and hashes one
image file per image and fit (about 0.15 ms), a fixed cost that weighs more
against cheaper extraction (smaller ``--image-size``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from threadpoolctl import threadpool_limits

from skt import FeatureExtractor
from skt.bench import HEAD_BLAS_THREADS, format_machine, machine_info
from skt.datasets import load_elpv, subsample

GRID = {"logisticregression__C": [0.01, 0.1, 1, 10, 100, 1000]}
FOLDS = 5


def make_extractor(args: argparse.Namespace, cache=None) -> FeatureExtractor:
    return FeatureExtractor("efficientnet_lite0", image_size=args.image_size,
                            batch_size=args.batch_size, num_workers=None, cache=cache)


def search(estimator, X, y) -> tuple[float, GridSearchCV]:
    """Wall time of the GridSearchCV fit, and the fitted search.

    ``estimator`` is a pipeline ending in ``LogisticRegression``; on
    precomputed features it is that pipeline alone.
    """
    searcher = GridSearchCV(estimator, GRID, cv=FOLDS)
    start = time.perf_counter()
    searcher.fit(X, y)
    return time.perf_counter() - start, searcher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300,
                        help="stratified subset of the 2,624 ELPV images (default 300)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="crop size fed to EfficientNet-Lite0 (default 224, its own)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    # C up to 1000 on unscaled features stops at LogisticRegression's default
    # max_iter=100: the same head, with the same warnings, in every variant.
    warnings.filterwarnings("ignore", category=ConvergenceWarning)

    print(format_machine(machine_info()))
    elpv = subsample(load_elpv(return_paths=True), args.images, random_state=0)
    X, y = elpv.images, elpv.target
    n_fits = len(GRID["logisticregression__C"]) * FOLDS + 1
    print(f"GridSearchCV(Pipeline(FeatureExtractor('efficientnet_lite0', image_size="
          f"{args.image_size}), LogisticRegression()), C in {GRID['logisticregression__C']}, "
          f"cv={FOLDS}): {n_fits} fits on {len(y)} ELPV images (paths, decoded in "
          f"threads); scikit-learn heads with {HEAD_BLAS_THREADS} BLAS thread.")

    # Load the weights and build the engine (an ONNX export, if that is the engine)
    # before any timing: every variant below reuses them.
    engine = make_extractor(args).fit(X[:2]).engine_
    make_extractor(args).fit(X[:2]).transform(X[:2])
    print(f"Engine: {engine}.\n")

    times = {}
    with threadpool_limits(HEAD_BLAS_THREADS, user_api="blas"), \
            tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        features = make_extractor(args).fit(X).transform(X)
        times["extraction"] = time.perf_counter() - start
        times["heads"], reference = search(make_pipeline(LogisticRegression()), features, y)
        times["reference"] = times["extraction"] + times["heads"]
        times["no cache"], uncached = search(
            make_pipeline(make_extractor(args), LogisticRegression()), X, y)
        times["cold cache"], cold = search(
            make_pipeline(make_extractor(args, cache), LogisticRegression()), X, y)
        times["warm cache"], warm = search(
            make_pipeline(make_extractor(args, cache), LogisticRegression()), X, y)

    print(f"{'one extraction of all images':<44}{times['extraction']:8.1f} s")
    print(f"{'+ the search on precomputed features':<44}{times['heads']:8.1f} s")
    print(f"{'= reference':<44}{times['reference']:8.1f} s\n")
    for name in ("no cache", "cold cache", "warm cache"):
        print(f"{'search, ' + name:<44}{times[name]:8.1f} s")
    print()
    cold_ratio = times["cold cache"] / times["reference"]
    warm_speedup = times["no cache"] / times["warm cache"]
    print(f"cold cache / reference      {cold_ratio:6.2f} x   (expected <= 1.3: "
          f"{'met' if cold_ratio <= 1.3 else 'NOT met'})")
    print(f"no cache / warm cache       {warm_speedup:6.1f} x   (expected >= 20: "
          f"{'met' if warm_speedup >= 20 else 'NOT met'})")
    print(f"no cache / cold cache       {times['no cache'] / times['cold cache']:6.1f} x")
    same = all(s.best_params_ == uncached.best_params_ and np.isclose(
        s.best_score_, uncached.best_score_) for s in (cold, warm))
    print(f"\nBest C {uncached.best_params_['logisticregression__C']}, CV accuracy "
          f"{uncached.best_score_:.3f}; identical in all three searches: {same} "
          f"(on precomputed features: C {reference.best_params_['logisticregression__C']}, "
          f"{reference.best_score_:.3f}).")


if __name__ == "__main__":
    main()
