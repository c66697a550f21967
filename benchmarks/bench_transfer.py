"""Transfer learning against classic baselines, on any data set, in one run.

The comparison of ``skt demo`` with its knobs exposed: majority class; raw
pixels + LogisticRegression, LinearSVC, PCA + LDA (and SVC); for each
backbone, its features + LogisticRegression, SVC (RBF), PCA + LDA, every head
tuned by GridSearchCV on the training part with the feature cache; and each
backbone fine-tuned with a short fixed budget. Writes ``results.json``,
``results.md`` and ``results.png`` into ``--output``.

Data sets:

- ``elpv``: the 2,624 ELPV solar cells (``pip install elpv-dataset``), one
  stratified 75/25 split by default; the published results of Deitsch et al.
  (2019) are shown beside the table.
- ``fashion_mnist``: the Fashion-MNIST IDX files (Debian's ``dataset-fashion-mnist``
  package, ``$SKT_DATA/fashion-mnist`` or ``--data DIR``; see
  ``skt.datasets.load_fashion_mnist``), on the official 60,000 / 10,000 split, with
  raw-pixel rows on the 28 x 28 pixels as they are, comparable with the
  benchmark published with the data set (shown beside the table).
  ``--train-size`` takes a stratified subset of the training images.
- ``digits``: scikit-learn's 1,797 digits as 64 x 64 images.
- ``folder:PATH``: a folder of class subfolders (``PATH/<class>/<image>``),
  checked as ``skt compare PATH`` checks it (which runs the comparison on
  one backbone with the demo's settings).

With several backbones that have published ImageNet accuracies (e.g. the
three EfficientNet-Lite variants) it also reports, after Kornblith et al.
(2019), "Do better ImageNet models transfer better?", each backbone's
linear-probe accuracy (features + LogisticRegression) against its ImageNet
top-1 accuracy, and their correlation. Examples::

    python benchmarks/bench_transfer.py --dataset elpv --cv 5
    python benchmarks/bench_transfer.py --dataset elpv \\
        --backbones efficientnet_lite0,efficientnet_lite1,efficientnet_lite2
    python benchmarks/bench_transfer.py --dataset elpv --precision float32,int8
    python benchmarks/bench_transfer.py --dataset fashion_mnist --train-size 5000 \\
        --image-size 64 --finetune-epochs 0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.base import clone

from skt import FeatureExtractor
from skt.bench import (
    Reference,
    compare_with_imagenet,
    feature_input,
    feature_rows,
    finetune_row,
    format_imagenet_comparison,
    majority_row,
    pixel_input,
    pixel_rows,
    run_comparison,
    write_results,
)
from skt.datasets import load_digits_images, load_elpv, load_fashion_mnist, subsample

FASHION_REFERENCES = (
    Reference("LogisticRegression on raw pixels (Fashion-MNIST benchmark)", 0.842,
              "Xiao et al., 2017, benchmark table published with Fashion-MNIST"),
    Reference("SVC (RBF) on raw pixels (Fashion-MNIST benchmark)", 0.897,
              "Xiao et al., 2017, benchmark table published with Fashion-MNIST"),
)
PIXEL_SIZES = {"elpv": 32, "fashion_mnist": None, "digits": 8, "folder": 32}


def load_data(args: argparse.Namespace) -> dict:
    """Images, labels, an optional fixed split, strata, references and a description."""
    name = "folder" if args.dataset.startswith("folder:") else args.dataset
    if name == "fashion_mnist":
        return _fashion(args)
    if name == "elpv":
        from skt.bench.demo import REFERENCES

        bunch = load_elpv(return_paths=True)
        bunch = subsample(bunch, args.images, random_state=args.seed) if args.images else bunch
        strata = [f"{p:.2f}|{t}" for p, t in zip(bunch.probability, bunch.cell_type,
                                                 strict=True)]
        return {"images": bunch.images, "y": bunch.target, "stratify": strata,
                "references": REFERENCES, "name": "ELPV (elpv-dataset)",
                "description": bunch.DESCR,
                "note": "stratified by defect probability and cell type"}
    if name == "digits":
        bunch = load_digits_images()
        bunch = subsample(bunch, args.images, random_state=args.seed) if args.images else bunch
        return {"images": bunch.images, "y": bunch.target, "name": "digits (64 x 64)",
                "description": bunch.DESCR}
    if name == "folder":
        from skt.bench.demo import load_comparison_folder

        root = args.dataset.split(":", 1)[1]
        try:  # the checks of skt compare: two classes or more, enough images in each
            paths, labels = load_comparison_folder(
                root, test_size=1 / args.cv if args.cv else args.test_size, cv=args.search_cv,
                n_images=args.images, random_state=args.seed)
        except ValueError as exc:
            raise SystemExit(f"--dataset {args.dataset!r}: {exc}") from None
        return {"images": paths, "y": labels, "name": f"folder {root}",
                "description": f"images in class subfolders of {root}"}
    raise SystemExit(f"--dataset {args.dataset!r}: choose elpv, fashion_mnist, digits or "
                     "folder:PATH.")


def _fashion(args: argparse.Namespace) -> dict:
    train = load_fashion_mnist(args.data, subset="train")
    test = load_fashion_mnist(args.data, subset="test")
    if args.train_size:
        train = subsample(train, args.train_size, random_state=args.seed)
    if args.test_size_limit:
        test = subsample(test, args.test_size_limit, random_state=args.seed)
    images = np.concatenate([train.images, test.images])
    y = np.concatenate([train.target, test.target])
    n_train = len(train.target)
    split = None if args.cv else (np.arange(n_train), np.arange(n_train, len(y)))
    note = (f"official split: {n_train} training images"
            f"{' (stratified subset of 60,000)' if args.train_size else ''}, "
            f"{len(test.target)} test images"
            f"{' (stratified subset of 10,000)' if args.test_size_limit else ''}")
    if args.cv:
        note = f"--cv pools the {len(y)} training and test images"
    return {"images": images, "y": y, "split": split, "references": FASHION_REFERENCES,
            "name": "Fashion-MNIST", "description": train.DESCR, "note": note}


def feature_cosine(reference: FeatureExtractor, other: FeatureExtractor, images) -> dict:
    """Per-image cosine of ``other``'s features to ``reference``'s, both fitted on all images
    (as the inputs were, so both read their cache)."""
    a = clone(reference).fit(images).transform(images)
    b = clone(other).fit(images).transform(images)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    text = (f"{other.backbone} {other.precision} features: cosine to {reference.precision} "
            f"mean {cosine.mean():.4f}, min {cosine.min():.4f} over {len(cosine)} images")
    return {"backbone": str(other.backbone), "precision": other.precision,
            "reference": reference.precision, "mean": float(cosine.mean()),
            "min": float(cosine.min()), "text": text}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="elpv",
                        help="elpv, fashion_mnist, digits or folder:PATH (default elpv)")
    parser.add_argument("--data", default=None,
                        help="fashion_mnist: data_home of the IDX files (default: $SKT_DATA, "
                             "~/skt_data, then Debian's folder)")
    parser.add_argument("--backbones", default="efficientnet_lite0",
                        help="comma-separated backbone names (default efficientnet_lite0)")
    parser.add_argument("--precision", default="float32",
                        help="comma-separated FeatureExtractor precisions, e.g. float32,int8: "
                             "each after the first adds a linear-probe row of its own and its "
                             "features' cosine to the first's (default float32)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="crop size for the feature rows (default: each backbone's own)")
    parser.add_argument("--cv", type=int, default=None,
                        help="K-fold cross-validation (mean ± std) instead of one split")
    parser.add_argument("--test-size", type=float, default=0.25,
                        help="held-out share of the single split (default 0.25)")
    parser.add_argument("--images", type=int, default=None,
                        help="elpv, digits, folder: stratified subset of this many images")
    parser.add_argument("--train-size", type=int, default=None,
                        help="fashion_mnist: stratified subset of the 60,000 training images")
    parser.add_argument("--test-size-limit", type=int, default=None,
                        help="fashion_mnist: stratified subset of the 10,000 test images")
    parser.add_argument("--pixel-size", type=int, default=None,
                        help="side of the raw-pixel rows' images, 0 for as they are "
                             "(default: 32; 28 x 28 as they are for fashion_mnist; 8 for digits)")
    parser.add_argument("--pixel-svc", action=argparse.BooleanOptionalAction, default=None,
                        help="add raw pixels + SVC (RBF) (default: only for fashion_mnist)")
    parser.add_argument("--search-cv", type=int, default=5,
                        help="folds of each head's grid search (default 5)")
    parser.add_argument("--finetune-epochs", type=int, default=2,
                        help="epochs of the fine-tuned rows, 0 for none (default 2)")
    parser.add_argument("--finetune-size", type=int, default=128,
                        help="crop size of the fine-tuned rows (default 128)")
    parser.add_argument("--output", default=None,
                        help="output folder (default bench-results/<dataset>)")
    parser.add_argument("--cache", default=None,
                        help="feature cache folder (default <output>/cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=1)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    kind = "folder" if args.dataset.startswith("folder:") else args.dataset
    if kind not in PIXEL_SIZES:
        sys.exit(f"--dataset {args.dataset!r}: choose elpv, fashion_mnist, digits or folder:PATH.")
    output = Path(args.output or Path("bench-results") / kind)
    cache = Path(args.cache) if args.cache else output / "cache"
    backbones = [name.strip() for name in args.backbones.split(",") if name.strip()]
    pixel_size = PIXEL_SIZES[kind] if args.pixel_size is None else (args.pixel_size or None)
    pixel_svc = kind == "fashion_mnist" if args.pixel_svc is None else args.pixel_svc

    data = load_data(args)
    rows = [majority_row(), *pixel_rows(cv=args.search_cv, random_state=args.seed,
                                        svc=pixel_svc)]
    inputs = [pixel_input(pixel_size)]
    precisions = [name.strip() for name in args.precision.split(",") if name.strip()]
    extractors = {}
    for backbone in backbones:
        for precision in precisions:
            extractor = FeatureExtractor(backbone, image_size=args.image_size, num_workers=None,
                                         cache=cache, precision=precision, verbose=args.verbose)
            extractors[backbone, precision] = extractor
            if precision == precisions[0]:
                inputs.append(feature_input(extractor))
                rows += feature_rows(extractor, cv=args.search_cv, random_state=args.seed)
            else:  # the linear probe: a calibrated precision fits on each training part
                name = f"{backbone} {precision}"
                short = backbone.replace("efficientnet_lite", "Lite")
                inputs.append(feature_input(extractor, name))
                rows += feature_rows(extractor, input=name, cv=args.search_cv,
                                     random_state=args.seed, heads=("logreg",),
                                     label=f"{short} {precision} features")
    if args.finetune_epochs:
        rows += [finetune_row(backbone, image_size=args.finetune_size,
                              max_iter=args.finetune_epochs, random_state=args.seed,
                              verbose=args.verbose) for backbone in backbones]
    y = np.asarray(data["y"])
    results = run_comparison(
        data["images"], y, rows, inputs=inputs, test_size=args.test_size, cv=args.cv,
        split=data.get("split"), stratify=data.get("stratify"), random_state=args.seed,
        dataset={"name": data["name"], "n_images": len(y),
                 "class_counts": dict(zip(*(v.tolist() for v in np.unique(y, return_counts=True)),
                                          strict=True)),
                 "note": data.get("note", ""), "description": data["description"]},
        references=data.get("references", ()),
        title=(f"{data['name']}: {len(y)} images, "
               + (f"{args.cv}-fold cross-validation" if args.cv else
                  "official split" if data.get("split") else
                  f"stratified {round(100 * (1 - args.test_size))}/"
                  f"{round(100 * args.test_size)} split")),
        verbose=args.verbose,
    )
    for (backbone, precision), extractor in extractors.items():
        if precision != precisions[0]:
            results.setdefault("feature_cosines", []).append(feature_cosine(
                extractors[backbone, precisions[0]], extractor, data["images"]))
            print(results["feature_cosines"][-1]["text"])
    summary = compare_with_imagenet(results, backbones)
    if summary is not None:
        results["transfer_vs_imagenet"] = summary
        print("\n" + format_imagenet_comparison(summary))
    results["command"] = " ".join(["python benchmarks/bench_transfer.py", *sys.argv[1:]])
    results["wall_seconds"] = time.perf_counter() - start
    paths = write_results(results, output)
    print(f"\nWrote {', '.join(str(p) for p in paths.values())} in "
          f"{results['wall_seconds']:.0f} s.")


if __name__ == "__main__":
    main()
