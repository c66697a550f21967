"""The learning curve of transfer learning on ELPV solar cells: accuracy against labelled images.

Held-out accuracy against the number of labelled training images, for raw
pixels (32 x 32) + LogisticRegression, EfficientNet-Lite0 features (224 px)
+ SVC (RBF), both tuned by GridSearchCV on the training subset, and a
FineTuneClassifier with the parameters of ``FINETUNE_PARAMS``. The data are
the 2,624 ELPV cells (``pip install elpv-dataset``) on the demo's split:
stratified 75/25 by defect probability and cell type, seed 0, so the 656 test
images are the demo's. Each point is the mean over ``--seeds`` random
training subsets of that size, stratified by class and drawn from the 1,968
training images (the same subsets for every method), with their standard
deviation, min and max::

    python benchmarks/bench_curve.py
    python benchmarks/bench_curve.py --sizes 50 100 200 500 1000 all --seeds 3 \\
        --methods pixels features finetune --finetune-params '{"max_iter": 3}'

Writes ``curve.json`` (every accuracy, fit seconds, best hyper-parameters,
the subsets' indices, the machine), ``curve.md`` (a table: sizes by methods,
"mean ± std") and ``curve.png`` (the curves on a log axis, with min-max
bands) into ``--output`` (default ``bench-results/curve``). The Lite0
features are extracted once into ``<output>/cache``, and every fit of the
searches reads them from there; a second run reads them instead of
computing them. ``--quick`` (sizes 50 and 100, 2 seeds, features at 128 px,
fine-tuning 1 epoch at 64 px) is a smoke run of a few minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from skt.bench import (
    Row,
    feature_input,
    feature_rows,
    pixel_input,
    pixel_rows,
    run_learning_curve,
    write_learning_curve,
)
from skt.bench.demo import SEED
from skt.datasets import load_elpv
from skt.extractor import FeatureExtractor

FINETUNE_PARAMS = dict(backbone="efficientnet_lite0", random_state=0)
"""Keyword arguments of the fine-tuned method's FineTuneClassifier: its defaults
(224 px, ``freeze="auto"``, 6 epochs), the recipe README's ablation chose."""

QUICK = {"sizes": ["50", "100"], "seeds": 2, "feature_size": 128,
         "finetune": {"image_size": 64, "max_iter": 1}}
METHODS = ("pixels", "features", "finetune")


def finetune_method(params: dict) -> Row:
    """A FineTuneClassifier with ``params`` (decoding threads and silence by default)."""
    from skt.finetune import FineTuneClassifier

    params = {"num_workers": None, "verbose": 0, **params}
    estimator = FineTuneClassifier(**params)
    backbone, size = estimator.backbone, estimator.image_size
    epochs = f"{estimator.max_iter} epoch{'' if estimator.max_iter == 1 else 's'}"
    pixels = "native size" if size is None else f"{size} px"
    shown = ", ".join(f"{key}={value!r}" for key, value in params.items())
    return Row(f"{backbone} fine-tuned ({epochs}, {pixels})", estimator, group="fine-tuned",
               description=f"FineTuneClassifier({shown}); no search", info={"params": params})


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["50", "100", "200", "500", "1000", "all"],
                        help="numbers of training images, or 'all' (default 50 100 200 500 "
                             "1000 all)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="random training subsets per size (default 3)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="which methods to run (default all three)")
    parser.add_argument("--finetune-params", type=json.loads, default={},
                        help="JSON object merged into FINETUNE_PARAMS, e.g. '{\"max_iter\": 3}'")
    parser.add_argument("--output", default="bench-results/curve",
                        help="output folder (default bench-results/curve)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: sizes 50 100, 2 seeds, features at 128 px, fine-tuning "
                             "1 epoch at 64 px")
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)
    if not isinstance(args.finetune_params, dict):
        parser.error("--finetune-params must be a JSON object, e.g. '{\"max_iter\": 3}'.")
    for size in args.sizes:
        if size != "all" and not size.isdigit():
            parser.error(f"--sizes {size}: use whole numbers of images or 'all'.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    sizes = QUICK["sizes"] if args.quick else args.sizes
    seeds = QUICK["seeds"] if args.quick else args.seeds
    output = Path(args.output)
    elpv = load_elpv(return_paths=True)
    strata = [f"{p:.2f}|{t}" for p, t in zip(elpv.probability, elpv.cell_type, strict=True)]

    rows, inputs = [], []
    if "pixels" in args.methods:
        rows.append(pixel_rows(cv=5, random_state=SEED)[0])
        inputs.append(pixel_input(32))
    if "features" in args.methods:
        extractor = FeatureExtractor("efficientnet_lite0",
                                     image_size=QUICK["feature_size"] if args.quick else 224,
                                     num_workers=None, cache=output / "cache",
                                     verbose=args.verbose)
        rows += feature_rows(extractor, cv=5, random_state=SEED, heads=("svc",))
        inputs.append(feature_input(extractor))
    if "finetune" in args.methods:
        rows.append(finetune_method({**FINETUNE_PARAMS, **(QUICK["finetune"] if args.quick
                                                           else {}), **args.finetune_params}))

    results = run_learning_curve(
        elpv.images, elpv.target, rows, inputs=inputs,
        train_sizes=[size if size == "all" else int(size) for size in sizes], n_seeds=seeds,
        test_size=0.25, stratify=strata, random_state=SEED,
        dataset={"name": "ELPV (elpv-dataset)", "n_images": len(elpv.target),
                 "note": "label 1 = defective (expert defect probability >= 0.5); split "
                         "stratified by defect probability and cell type, as in skt demo",
                 "licence": "CC BY-NC-SA 4.0 (research and other non-commercial use)"},
        title=(f"ELPV solar cells, defective vs functional: learning curve"
               f"{' (quick)' if args.quick else ''}"),
        verbose=args.verbose)
    results["command"] = " ".join(["python benchmarks/bench_curve.py", *sys.argv[1:]])
    results["wall_seconds"] = time.perf_counter() - start
    paths = write_learning_curve(results, output)
    print(f"\nWrote {', '.join(str(p) for p in paths.values())} in "
          f"{results['wall_seconds']:.0f} s.")


if __name__ == "__main__":
    main()
