"""The fine-tuning ablation on the demo's ELPV split: each change, its accuracy and its cost.

Every row is a ``FineTuneClassifier`` (EfficientNet-Lite0 unless the row
names another backbone) fitted on the
1,968 training cells of ``skt demo``'s split (stratified 75/25 by defect
probability and cell type, seed 0) and scored on its 656 test cells, one
after another in one run, with accuracy, balanced accuracy, macro-F1,
ROC-AUC and fit and predict seconds. ``defaults`` is
``FineTuneClassifier()`` itself; the other rows change one thing::

    python benchmarks/bench_recipe.py                      # every row, about 45 minutes
    python benchmarks/bench_recipe.py --rows lite2-freeze4-8-epochs  # the most accurate, 8 min
    python benchmarks/bench_recipe.py --rows defaults swa3  # some of them
    python benchmarks/bench_recipe.py --params '{"max_iter": 8}'  # one row of your own

Writes ``results.json``, ``results.md`` and ``results.png`` into
``--output`` (default ``bench-results/recipe``). README, "Fine-tuning on a
CPU", holds the table this printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from skt.bench import Row, run_comparison, write_results
from skt.bench.demo import REFERENCES, SEED
from skt.datasets import load_elpv

BASE = {"backbone": "efficientnet_lite0", "random_state": SEED}
"""Parameters of every row; each row's own are added to them."""

RECIPES = {
    "old-demo": {"image_size": 128, "max_iter": 2, "freeze": 3, "learning_rate_init": 1e-3},
    "lr-1e-3": {"learning_rate_init": 1e-3},
    "defaults": {},
    "defaults-swa3": {"average_epochs": 3},
    "lr-1e-3-4-epochs-lp": {"learning_rate_init": 1e-3, "max_iter": 4,
                            "head_init": "linear_probe"},
    "lr-1e-3-lp": {"learning_rate_init": 1e-3, "head_init": "linear_probe"},
    "lr-1e-3-lp-swa3": {"learning_rate_init": 1e-3, "head_init": "linear_probe",
                        "average_epochs": 3},
    "lr-1e-3-lp-freeze5": {"learning_rate_init": 1e-3, "head_init": "linear_probe",
                           "freeze": 5},
    "lr-1e-3-lp-backbone-lr1": {"learning_rate_init": 1e-3, "head_init": "linear_probe",
                                "backbone_lr_scale": 1.0},
    "lr-1e-3-lp-balanced": {"learning_rate_init": 1e-3, "head_init": "linear_probe",
                            "class_weight": "balanced"},
    "lr-1e-3-lp-dihedral-8": {"learning_rate_init": 1e-3, "head_init": "linear_probe",
                              "augment": "dihedral", "max_iter": 8},
    "lr-1e-3-lp-dihedral-8-tta": {"learning_rate_init": 1e-3, "head_init": "linear_probe",
                                  "augment": "dihedral", "max_iter": 8, "tta": "dihedral"},
    "lr-1e-3-lp-300px": {"learning_rate_init": 1e-3, "head_init": "linear_probe",
                         "image_size": 300},
    "lr-1e-3-10-epochs-swa5": {"learning_rate_init": 1e-3, "max_iter": 10,
                               "average_epochs": 5},
    "lite2-defaults": {"backbone": "efficientnet_lite2"},
    "lite2-freeze4-8-epochs": {"backbone": "efficientnet_lite2", "freeze": 4, "max_iter": 8},
}
"""Named rows: the changes README's ablation table reports."""


def recipe_row(name: str, params: dict, verbose: int) -> Row:
    from skt.finetune import FineTuneClassifier

    params = {**BASE, **params}
    shown = ", ".join(f"{key}={value!r}" for key, value in params.items())
    return Row(name, FineTuneClassifier(num_workers=None, verbose=verbose, **params),
               group="fine-tuned", description=f"FineTuneClassifier({shown})",
               info={"params": params})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=sorted(RECIPES), default=list(RECIPES),
                        help="named rows to run, in this order (default: all)")
    parser.add_argument("--params", type=json.loads, default=None,
                        help="one row of your own: JSON keyword arguments of FineTuneClassifier")
    parser.add_argument("--output", default="bench-results/recipe")
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    elpv = load_elpv(return_paths=True)
    strata = [f"{p:.2f}|{t}" for p, t in zip(elpv.probability, elpv.cell_type, strict=True)]
    rows = ([recipe_row("custom", args.params, args.verbose)] if args.params is not None
            else [recipe_row(name, RECIPES[name], args.verbose) for name in args.rows])
    results = run_comparison(
        elpv.images, elpv.target, rows, test_size=0.25, stratify=strata, random_state=SEED,
        dataset={"name": "ELPV (elpv-dataset)", "n_images": len(elpv.target),
                 "licence": "CC BY-NC-SA 4.0 (research and other non-commercial use)"},
        references=REFERENCES, title="Fine-tuning on ELPV: what each change does",
        verbose=args.verbose)
    results["command"] = " ".join(["python benchmarks/bench_recipe.py", *sys.argv[1:]])
    results["wall_seconds"] = time.perf_counter() - start
    paths = write_results(results, args.output)
    print(f"\nWrote {', '.join(str(p) for p in paths.values())} in "
          f"{results['wall_seconds']:.0f} s.")


if __name__ == "__main__":
    main()
