"""``skt demo`` and ``skt compare``: transfer learning against classic baselines.

``skt demo`` runs the comparison on real solar-cell images: the 2,624
electroluminescence images of the ELPV data set
(:func:`skt.datasets.load_elpv`, from the ``elpv-dataset`` package; CC BY-NC-SA
4.0, for research and other non-commercial use), where a cell is defective
when its expert defect probability is at least 0.5 (821 of 2,624).
``skt compare FOLDER`` runs the same comparison on the user's own images, a
folder of class subfolders (:func:`compare_folder`). Both call
:func:`run_transfer_comparison`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.utils import Bunch

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
from skt.images import load_image_folder

__all__ = [
    "DEMO_SETTINGS",
    "QUICK_SETTINGS",
    "REFERENCES",
    "DemoSettings",
    "compare_folder",
    "load_comparison_folder",
    "run_demo",
    "run_transfer_comparison",
]

SEED = 0

_PAPER = "Solar Energy 185 (2019) 455-468, on their own 75/25 split"
REFERENCES = (
    Reference("SVM on hand-crafted features (Deitsch et al., 2019)", 0.8244, _PAPER),
    Reference("fine-tuned VGG-19 (Deitsch et al., 2019)", 0.8842, _PAPER),
)
"""The published ELPV results printed beside the demo table."""


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and budgets of one demo (or compare) run.

    Attributes
    ----------
    n_images : int or None
        Stratified subset of the images to use; None for all of them.
    feature_size : int
        Crop size fed to the backbone for the feature rows.
    pixel_size : int
        Side the raw-pixel rows downsample the images to.
    cv : int
        Folds of each grid search on the training part.
    finetune_size : int
        Crop size for the fine-tuned row.
    finetune_epochs : int
        Epochs of fine-tuning.
    finetune_freeze : int, "auto" or None
        Stages of the backbone (from the input side) kept at their ImageNet
        weights.
    quick : bool
        Whether these are the settings of ``--quick``.
    """

    n_images: int | None
    feature_size: int
    pixel_size: int
    cv: int
    finetune_size: int
    finetune_epochs: int
    finetune_freeze: int | str | None
    quick: bool = False


DEMO_SETTINGS = DemoSettings(n_images=None, feature_size=224, pixel_size=32, cv=5,
                             finetune_size=224, finetune_epochs=6, finetune_freeze="auto")
"""``skt demo``: all images; Lite0 features at its native 224 px."""

QUICK_SETTINGS = DemoSettings(n_images=400, feature_size=160, pixel_size=32, cv=3,
                              finetune_size=64, finetune_epochs=1, finetune_freeze="auto",
                              quick=True)
"""``skt demo --quick``: 400 images, smaller crops, one epoch of fine-tuning."""


def run_transfer_comparison(images, y, *, settings: DemoSettings = DEMO_SETTINGS,
                            backbone: str = "efficientnet_lite0", weights: Any = "DEFAULT",
                            finetune: bool = True, test_size: float = 0.25, stratify=None,
                            random_state: int = SEED, dataset: dict | None = None,
                            references: Sequence[Reference] = (), title: str = "Comparison",
                            output: str | os.PathLike = "demo-results",
                            verbose: int = 1) -> dict:
    """The comparison of ``skt demo`` and ``skt compare`` on any labelled images.

    One stratified train/test split; every head is tuned by ``GridSearchCV``
    (accuracy, ``settings.cv`` stratified folds) on the training part only.
    Rows:

    - majority class;
    - raw pixels (downsampled to ``settings.pixel_size``) + LogisticRegression,
      LinearSVC, and PCA + LinearDiscriminantAnalysis;
    - ``backbone`` features at ``settings.feature_size`` + LogisticRegression,
      SVC (RBF) and PCA + LinearDiscriminantAnalysis, each a
      ``Pipeline(FeatureExtractor(cache=...), head)`` searched over the head's
      hyper-parameters: the features are extracted once, into the feature
      cache ``<output>/cache``, and every fit of the search reads them from
      there;
    - with ``finetune``, :class:`skt.FineTuneClassifier` on ``backbone``
      with its defaults and no search: ``settings.finetune_size`` px,
      ``settings.finetune_epochs`` epochs, ``settings.finetune_freeze``
      (see :func:`skt.bench.finetune_row`).

    Parameters
    ----------
    images : images
        Anything :mod:`skt.images` accepts (paths, arrays, ...).
    y : array-like of shape (n_images,)
        Class labels (two or more classes; strings stay strings).
    settings : DemoSettings, default=DEMO_SETTINGS
        Sizes and budgets; ``n_images`` is the caller's to apply.
    backbone : str, default="efficientnet_lite0"
        A name from :func:`skt.list_backbones`.
    weights : str, path or None, default="DEFAULT"
        The backbone's weights; None for random initialisation (seeded by
        ``random_state``).
    finetune : bool, default=True
        Add the fine-tuned row.
    test_size : float, default=0.25
        Held-out share of the images.
    stratify : array-like, optional
        Labels to stratify the split on; default ``y``.
    random_state : int, default=0
        Seeds the split, the searches' folds, random weights and fine-tuning.
    dataset : dict, optional
        Description of the data, stored in the results.
    references : sequence of Reference, default=()
        Published results shown beside the table.
    title : str, default="Comparison"
        Heading of the table and chart.
    output : str or path, default="demo-results"
        Folder for ``results.json``, ``results.md``, ``results.png`` and the
        feature cache; created if missing.
    verbose : int, default=1
        0 prints nothing; 1 prints the machine, progress bars, a line per row,
        the table and the files written.

    Returns
    -------
    results : dict
        What ``results.json`` holds (see :func:`skt.bench.run_comparison`),
        with the ``settings`` of the run.
    """
    start = time.perf_counter()
    output = expand_path(output)
    output.mkdir(parents=True, exist_ok=True)
    chart = _has_matplotlib(verbose)
    extractor = FeatureExtractor(backbone, weights=weights, image_size=settings.feature_size,
                                 num_workers=None, cache=output / "cache",
                                 random_state=random_state if weights is None else None,
                                 verbose=verbose)
    rows = [
        majority_row(),
        *pixel_rows(cv=settings.cv, random_state=random_state),
        *feature_rows(extractor, cv=settings.cv, random_state=random_state),
    ]
    if finetune:
        # weights only when they are not the default, so that the row reads as before
        chosen = {} if weights == "DEFAULT" else {"weights": weights}
        rows.append(finetune_row(backbone, image_size=settings.finetune_size,
                                 max_iter=settings.finetune_epochs,
                                 freeze=settings.finetune_freeze, random_state=random_state,
                                 verbose=verbose, **chosen))
    results = run_comparison(
        images, y, rows, inputs=[pixel_input(settings.pixel_size), feature_input(extractor)],
        test_size=test_size, stratify=stratify, random_state=random_state, dataset=dataset,
        references=references, title=title, verbose=verbose)
    results["settings"] = {**asdict(settings), "backbone": backbone,
                           "weights": None if weights is None else str(weights),
                           "finetune": finetune, "seed": random_state}
    results["wall_seconds"] = time.perf_counter() - start
    paths = write_results(results, output, chart=chart)
    if verbose:
        print(f"\nWrote {', '.join(str(p) for p in paths.values())}.")
        print(f"Feature cache: {output / 'cache'} (a second run reads the features from it; "
              "delete it to measure extraction again).")
        print(f"Total {results['wall_seconds']:.0f} s.")
    return results


def run_demo(quick: bool = False, output: str | Path = "demo-results",
             verbose: int = 1) -> dict:
    """Compare transfer learning with classic baselines on ELPV solar cells.

    One stratified 75/25 split (by defect probability and cell type, the
    protocol of Deitsch et al., 2019) with seed 0. Every head is tuned by
    ``GridSearchCV`` (accuracy, stratified folds) on the training part only.
    Rows (:func:`run_transfer_comparison`):

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
    settings = QUICK_SETTINGS if quick else DEMO_SETTINGS
    elpv = load_elpv(return_paths=True)
    if settings.n_images is not None:
        elpv = subsample(elpv, settings.n_images, random_state=SEED)
    strata = [f"{p:.2f}|{t}" for p, t in zip(elpv.probability, elpv.cell_type, strict=True)]
    return run_transfer_comparison(
        elpv.images, elpv.target, settings=settings, stratify=strata, random_state=SEED,
        dataset=_describe(elpv, settings), references=REFERENCES,
        title=(f"ELPV solar cells, defective vs functional: {len(elpv.target)} images, "
               f"stratified 75/25 split{' (quick subset)' if quick else ''}"),
        output=output, verbose=verbose)


def _least_per_class(test_size: float, cv: int) -> int:
    """Images a class needs: ``cv`` or more in the training part, one or more held out."""
    return max(math.ceil((cv + 1) / (1 - test_size)), math.ceil(1 / test_size), 2)


def load_comparison_folder(folder: str | os.PathLike, *, test_size: float = 0.25, cv: int = 5,
                           n_images: int | None = None,
                           random_state: int | None = SEED) -> tuple[list[str], np.ndarray]:
    """Image paths and labels of ``folder/<class>/<image>``, checked for a comparison.

    Every class must have enough images for a stratified split with
    ``test_size`` held out and ``cv``-fold grid searches on the training
    part (8 for a 75/25 split and 5 folds): each failure is a ``ValueError``
    that names the folder or class, its count, and what to do.

    Parameters
    ----------
    folder : str or path
        A folder with one subfolder of images per class.
    test_size : float, default=0.25
        Held-out share of the split.
    cv : int, default=5
        Folds of the grid searches on the training part.
    n_images : int, optional
        Keep a stratified subset of this many images, when there are more.
    random_state : int or None, default=0
        Seeds that subset.

    Returns
    -------
    paths : list of str
        Image files, by class then name.
    labels : ndarray of str
        The class (subfolder name) of each image.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> from PIL import Image
    >>> from skt.bench.demo import load_comparison_folder
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for label, count in (("cat", 8), ("dog", 3)):
    ...     (root / label).mkdir()
    ...     for i in range(count):
    ...         Image.new("RGB", (8, 8)).save(root / label / f"{i}.png")
    >>> load_comparison_folder(root)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Class 'dog' has 3 images, too few for a stratified 75/25 split with 5-fold ...
    """
    root = expand_path(folder)
    if not root.exists():
        raise ValueError(f"{str(folder)!r} does not exist; give a folder with one subfolder "
                         "of images per class (FOLDER/<class>/<image>).")
    paths, labels = load_image_folder(root)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"{str(folder)!r} holds one class ({str(classes[0])!r}, {counts[0]} "
                         "images); a comparison needs two or more: put each class's images "
                         "in a subfolder of their own (FOLDER/<class>/<image>).")
    subset = n_images is not None and n_images < len(labels)
    if subset:
        bunch = subsample(Bunch(images=paths, target=labels), n_images,
                          random_state=random_state)
        paths, labels = list(bunch.images), bunch.target
        classes, counts = np.unique(labels, return_counts=True)
    least = _least_per_class(test_size, cv)
    for label, count in zip(classes, counts, strict=True):
        if count < least:
            where = f" of the subset of {n_images}" if subset else ""
            held_out = f"{round(100 * (1 - test_size))}/{round(100 * test_size)}"
            raise ValueError(
                f"Class {str(label)!r} has {count} images{where}, too few for a stratified "
                f"{held_out} split with {cv}-fold grid searches on the training part, which "
                f"need {least} or more per class: add images to {str(root / label)!r}, or "
                "move that folder out of the comparison.")
    return paths, labels


def compare_folder(folder: str | os.PathLike, *, backbone: str = "efficientnet_lite0",
                   weights: Any = "DEFAULT", image_size: int | None = None,
                   quick: bool = False, finetune: bool = True, test_size: float = 0.25,
                   random_state: int = SEED, output: str | os.PathLike = "compare-results",
                   verbose: int = 1) -> dict:
    """``skt compare``: the demo's comparison on a folder of class subfolders.

    The rows of :func:`run_transfer_comparison` (raw pixels, ``backbone``
    features with the demo's heads, fine-tuning) on ``folder/<class>/<image>``,
    one stratified split with ``test_size`` held out. ROC-AUC is that of the
    second class (in sorted order) for two classes, else the macro average
    one-vs-rest.

    Parameters
    ----------
    folder : str or path
        One subfolder of images per class; checked by
        :func:`load_comparison_folder`.
    backbone : str, default="efficientnet_lite0"
        A name from :func:`skt.list_backbones`.
    weights : str, path or None, default="DEFAULT"
        The backbone's weights; None for random initialisation.
    image_size : int, optional
        Crop size of the feature rows and the fine-tuned row; default the
        demo's (224 px, or 160 and 64 with ``quick``).
    quick : bool, default=False
        The demo's quick settings: a stratified subset of 400 images (when
        there are more), 3-fold searches, one epoch of fine-tuning.
    finetune : bool, default=True
        Add the fine-tuned row (the demo's: 6 epochs, ``freeze="auto"``).
    test_size : float, default=0.25
        Held-out share of the images, in (0, 1).
    random_state : int, default=0
        Seeds the split, the subset, the searches' folds, random weights and
        fine-tuning.
    output : str or path, default="compare-results"
        Folder for ``results.json``, ``results.md``, ``results.png`` and the
        feature cache; created if missing.
    verbose : int, default=1
        As for :func:`run_transfer_comparison`.

    Returns
    -------
    results : dict
        What ``results.json`` holds.
    """
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1), the held-out share; got {test_size}.")
    settings = QUICK_SETTINGS if quick else DEMO_SETTINGS
    if image_size is not None:
        settings = replace(settings, feature_size=image_size, finetune_size=image_size)
    paths, labels = load_comparison_folder(folder, test_size=test_size, cv=settings.cv,
                                           n_images=settings.n_images,
                                           random_state=random_state)
    root = expand_path(folder)
    classes, counts = np.unique(labels, return_counts=True)
    held_out = f"{round(100 * (1 - test_size))}/{round(100 * test_size)}"
    dataset = {
        "name": f"folder {root}",
        "n_images": len(labels),
        "classes": [str(label) for label in classes],
        "class_counts": {str(label): int(count) for label, count in zip(classes, counts,
                                                                        strict=True)},
        "note": f"class subfolders of {root}; split stratified by class",
    }
    return run_transfer_comparison(
        paths, labels, settings=settings, backbone=backbone, weights=weights,
        finetune=finetune, test_size=test_size, random_state=random_state, dataset=dataset,
        title=(f"{root.name}: {len(labels)} images in {len(classes)} classes, stratified "
               f"{held_out} split{' (quick settings)' if quick else ''}"),
        output=output, verbose=verbose)


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
