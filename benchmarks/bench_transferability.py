"""Do transferability scores rank backbones as a trained linear probe does?

For each data set (a stratified subsample), in one run: EfficientNet-Lite0/1/2
(ImageNet weights) at two layers each, plus random-init ResNet-18 and
MobileNet-V3 controls at their penultimate features; for each, LogME and
H-score (``skt.rank_backbones``, one extraction each, feature cache) and the
cross-validated accuracy of a linear probe (StandardScaler +
LogisticRegression, 5 folds) on the same cached features. Then Kendall's tau
between each score and the probe accuracy, and whether the random-init
controls rank last. Then test-time augmentation on features
(``FeatureExtractor(tta=...)``): the same probe on Lite0's features of each
image alone, averaged with its mirror image (``"flip"``) and over its 8 flips
and quarter turns (``"dihedral"``). Fashion-MNIST needs its IDX files (Debian's
``dataset-fashion-mnist`` or ``$SKT_DATA/fashion-mnist``); without them it is
skipped with a message.

Usage::

    python benchmarks/bench_transferability.py [--images 600] [--image-size 128]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from scipy.stats import kendalltau
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skt import FeatureExtractor, rank_backbones
from skt.bench import format_machine, machine_info
from skt.datasets import load_elpv, load_fashion_mnist, subsample

LITE_LAYERS = ("blocks.12", None)  # the last block's output, and the penultimate features


def _candidates(image_size: int, cache: str) -> list[tuple[FeatureExtractor, bool]]:
    """(extractor, is a random-init control) for every row."""
    rows = []
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        for layer in LITE_LAYERS:
            rows.append((FeatureExtractor(name, layers=layer, image_size=image_size,
                                          cache=cache), False))
    for name in ("resnet18", "mobilenet_v3_large"):
        rows.append((FeatureExtractor(name, weights=None, random_state=0, image_size=image_size,
                                      cache=cache), True))
    return rows


def _dataset(name: str, n_images: int):
    if name == "elpv":
        data = load_elpv(return_paths=True)
    else:
        data = load_fashion_mnist(subset="train")
    return subsample(data, n_images, random_state=0)


def _run(name: str, args, cache: str) -> None:
    try:
        data = _dataset(name, args.images)
    except FileNotFoundError as exc:
        print(f"\n{name}: skipped ({exc})")
        return
    X, y = list(data.images), np.asarray(data.target)
    print(f"\n{name}: {len(y)} images, {len(np.unique(y))} classes, {args.image_size} px")
    print(f"  {'backbone:layer':<42} {'logme':>7} {'hscore':>7} {'probe':>6} {'s':>6}")
    rows = []
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    for extractor, control in _candidates(args.image_size, cache):
        start = time.perf_counter()
        scores = {}
        for metric in ("logme", "hscore"):
            [row] = _as_rows(rank_backbones(X, y, [extractor], metric=metric))
            scores[metric] = row["score"]
        probe = _probe(extractor.fit(X).transform(X), y, folds)  # features from the cache
        label = f"{row['backbone']}:{row['layer']}"
        rows.append({"label": label, "control": control, "probe": probe, **scores})
        print(f"  {label:<42} {scores['logme']:7.3f} {scores['hscore']:7.3f} {probe:6.3f} "
              f"{time.perf_counter() - start:6.1f}", flush=True)
    _report_ranks(rows)
    _run_tta(X, y, args.image_size, cache, folds)


def _probe(features, y, folds) -> float:
    return cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
                           features, y, cv=folds).mean()


def _run_tta(X, y, image_size: int, cache: str, folds) -> None:
    """The probe on Lite0 features without and with test-time augmentation."""
    print(f"  {'test-time augmentation (Lite0)':<42} {'probe':>6} {'s':>6}")
    for layer in LITE_LAYERS:
        for tta in (None, "flip", "dihedral"):
            start = time.perf_counter()
            extractor = FeatureExtractor("efficientnet_lite0", layers=layer, tta=tta,
                                         image_size=image_size, cache=cache)
            probe = _probe(extractor.fit(X).transform(X), y, folds)
            label = f"{layer or 'pre_logits'}, tta={tta}"
            print(f"  {label:<42} {probe:6.3f} {time.perf_counter() - start:6.1f}", flush=True)


def _report_ranks(rows: list[dict]) -> None:
    probe = [row["probe"] for row in rows]
    for metric in ("logme", "hscore"):
        tau = kendalltau([row[metric] for row in rows], probe).statistic
        order = sorted(rows, key=lambda row: -row[metric])
        controls_last = all(row["control"] for row in order[-2:])
        print(f"  {metric}: Kendall tau with the probe accuracy {tau:+.2f}; random-init "
              f"controls rank last: {'yes' if controls_last else 'no'}")


def _as_rows(table) -> list[dict]:
    return table.to_dict("records") if hasattr(table, "to_dict") else table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--datasets", default="elpv,fashion_mnist")
    parser.add_argument("--cache", help="feature cache folder (default: a temporary one)")
    args = parser.parse_args()

    print(format_machine(machine_info()))
    cache = args.cache or tempfile.mkdtemp(prefix="skt-bench-transferability-")
    for name in args.datasets.split(","):
        _run(name, args, cache)


if __name__ == "__main__":
    main()
