"""``skt demo``: transfer learning against classic baselines on real solar-cell images.

The data are the 2,624 electroluminescence images of the ELPV data set
(:func:`skt.datasets.load_elpv`, from the ``elpv-dataset`` package; CC BY-NC-SA
4.0, for research and other non-commercial use): a cell is defective when
its expert defect probability is at least 0.5 (821 of 2,624).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from skt._utils import expand_path
from skt.bench import (
    Reference,
    feature_input,
    feature_rows,
    finetune_row,
    majority_row,
    pixel_input,
    pixel_rows,
    run_comparison,
    write_results,
)
from skt.datasets import load_elpv, subsample
from skt.extractor import FeatureExtractor

__all__ = ["DEMO_SETTINGS", "QUICK_SETTINGS", "REFERENCES", "DemoSettings", "run_demo"]

SEED = 0

_PAPER = "Solar Energy 185 (2019) 455-468, on their own 75/25 split"
REFERENCES = (
    Reference("SVM on hand-crafted features (Deitsch et al., 2019)", 0.8244, _PAPER),
    Reference("fine-tuned VGG-19 (Deitsch et al., 2019)", 0.8842, _PAPER),
)
"""The published ELPV results printed beside the demo table."""


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and budgets of one demo run.

    Attributes
    ----------
    n_images : int or None
        Stratified subset of ELPV to use; None for all 2,624 images.
    feature_size : int
        Crop size fed to EfficientNet-Lite0 for the feature rows.
    pixel_size : int
        Side the raw-pixel rows downsample the 300 x 300 cells to.
    cv : int
        Folds of each grid search on the training part.
    finetune_size : int
        Crop size for the fine-tuned row.
    finetune_epochs : int
        Epochs of fine-tuning.
    finetune_freeze : int, "auto" or None
        Stages of Lite0 (from the input side) kept at their ImageNet weights.
    """

    n_images: int | None
    feature_size: int
    pixel_size: int
    cv: int
    finetune_size: int
    finetune_epochs: int
    finetune_freeze: int | str | None


DEMO_SETTINGS = DemoSettings(n_images=None, feature_size=224, pixel_size=32, cv=5,
                             finetune_size=224, finetune_epochs=6, finetune_freeze="auto")
"""``skt demo``: all images; Lite0 features at its native 224 px."""

QUICK_SETTINGS = DemoSettings(n_images=400, feature_size=160, pixel_size=32, cv=3,
                              finetune_size=64, finetune_epochs=1, finetune_freeze="auto")
"""``skt demo --quick``: 400 images, smaller crops, one epoch of fine-tuning."""


def run_demo(quick: bool = False, output: str | Path = "demo-results",
             verbose: int = 1) -> dict:
    """Compare transfer learning with classic baselines on ELPV solar cells.

    One stratified 75/25 split (by defect probability and cell type, the
    protocol of Deitsch et al., 2019) with seed 0. Every head is tuned by
    ``GridSearchCV`` (accuracy, stratified folds) on the training part only.
    Rows:

    - majority class;
    - raw pixels (cells downsampled to 32 x 32) + LogisticRegression,
      LinearSVC, and PCA + LinearDiscriminantAnalysis;
    - EfficientNet-Lite0 features + LogisticRegression, SVC (RBF) and
      PCA + LinearDiscriminantAnalysis, each a
      ``Pipeline(FeatureExtractor(cache=...), head)`` searched over the head's
      hyper-parameters: the features are extracted once, into the feature
      cache, and every fit of the search reads them from there;
    - :class:`skt.FineTuneClassifier` on Lite0 with its defaults and no
      search: 224 px, ``freeze="auto"`` (6 of 9 stages frozen and computed
      once per image), 6 epochs (see :func:`skt.bench.finetune_row`).

    The full run uses Lite0 features at its native 224 px; on an otherwise
    idle 2-core CPU it took 245 s (about 35 s extracting
    features with the ONNX engine, 2.5 minutes fine-tuning: one line per
    epoch), and longer while other jobs share the cores. With
    ``quick=True`` it uses a stratified subset of 400 images, features at
    160 px, 3-fold searches and 1 epoch of fine-tuning at 64 px, in under
    2 minutes.

    The feature cache lives in ``<output>/cache``, so a second run reads the
    features instead of computing them (and says so in its report); delete
    that folder to measure extraction again.

    Parameters
    ----------
    quick : bool, default=False
        Run on the subset with the smaller budget.
    output : str or path, default="demo-results"
        Folder for ``results.json``, ``results.md``, ``results.png`` and the
        feature cache; created if missing.
    verbose : int, default=1
        0 prints nothing; 1 prints the machine, progress bars, a line per row
        and the table with the published references beside it.

    Returns
    -------
    results : dict
        What ``results.json`` holds: per row the metrics, fit and predict
        seconds and best hyper-parameters; the data set, split sizes, seed,
        settings, machine and the published references.

    Examples
    --------
    >>> from skt.bench.demo import run_demo
    >>> results = run_demo(quick=True, output="demo-results", verbose=0)  # doctest: +SKIP
    >>> results["rows"][0]["name"]  # doctest: +SKIP
    'Majority class'
    """
    start = time.perf_counter()
    settings = QUICK_SETTINGS if quick else DEMO_SETTINGS
    output = expand_path(output)
    output.mkdir(parents=True, exist_ok=True)
    chart = _has_matplotlib(verbose)
    elpv = load_elpv(return_paths=True)
    if settings.n_images is not None:
        elpv = subsample(elpv, settings.n_images, random_state=SEED)
    strata = [f"{p:.2f}|{t}" for p, t in zip(elpv.probability, elpv.cell_type, strict=True)]

    extractor = FeatureExtractor("efficientnet_lite0", image_size=settings.feature_size,
                                 num_workers=None, cache=output / "cache", verbose=verbose)
    rows = [
        majority_row(),
        *pixel_rows(cv=settings.cv, random_state=SEED),
        *feature_rows(extractor, cv=settings.cv, random_state=SEED),
        finetune_row(image_size=settings.finetune_size, max_iter=settings.finetune_epochs,
                     freeze=settings.finetune_freeze,
                     random_state=SEED, verbose=verbose),
    ]
    n = len(elpv.target)
    results = run_comparison(
        elpv.images, elpv.target, rows,
        inputs=[pixel_input(settings.pixel_size), feature_input(extractor)],
        test_size=0.25, stratify=strata, random_state=SEED,
        dataset=_describe(elpv, settings),
        references=REFERENCES,
        title=(f"ELPV solar cells, defective vs functional: {n} images, stratified 75/25 "
               f"split{' (quick subset)' if quick else ''}"),
        verbose=verbose,
    )
    results["settings"] = {"quick": quick, **asdict(settings), "seed": SEED}
    results["wall_seconds"] = time.perf_counter() - start
    paths = write_results(results, output, chart=chart)
    if verbose:
        print(f"\nWrote {', '.join(str(p) for p in paths.values())}.")
        print(f"Feature cache: {output / 'cache'} (a second run reads the features from it; "
              "delete it to measure extraction again).")
        print(f"Total {results['wall_seconds']:.0f} s.")
    return results


def _has_matplotlib(verbose: int) -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if verbose:
            print("matplotlib is not installed, so no chart will be drawn: "
                  "pip install 'skt[bench]'.")
        return False
    return True


def _describe(elpv, settings: DemoSettings) -> dict:
    counts = np.bincount(elpv.target, minlength=2)
    return {
        "name": "ELPV (elpv-dataset)",
        "n_images": len(elpv.target),
        "subset": settings.n_images is not None,
        "classes": {"0": "functional", "1": "defective"},
        "class_counts": {"0": int(counts[0]), "1": int(counts[1])},
        "note": ("label 1 = defective (expert defect probability >= 0.5); split stratified "
                 "by defect probability and cell type"),
        "licence": "CC BY-NC-SA 4.0 (research and other non-commercial use)",
        "description": elpv.DESCR,
    }
