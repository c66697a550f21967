"""Domain adaptation on ELPV's two cell types: train on one type's labels, test on the other.

ELPV's 2,624 cells are 1,074 monocrystalline and 1,550 polycrystalline, all
labelled (defective when the experts' probability is at least 0.5). For each
direction (mono -> poly, poly -> mono), in one run:

- the source type's cells come with labels;
- the target type's cells are split in two stratified halves: the *adaptation*
  half is given without labels (to the methods that adapt), the *test* half
  scores every row, so that all rows are compared on the same cells.

Rows: raw pixels (32 x 32) + LogisticRegression; Lite0 features (224 px,
penultimate layer, feature cache) + StandardScaler + LogisticRegression
with no adaptation; the same features through skada's CORAL, subspace
alignment and discriminator reweighting (``skada.make_da_pipeline`` with
``sample_domain``); FineTuneClassifier trained on the source alone, with
Deep CORAL and with DANN (``domain_adaptation=``); and the oracle: features
+ LogisticRegression trained on the adaptation half *with* its labels,
which no adaptation method sees.

Usage::

    python benchmarks/bench_domain.py [--finetune-epochs 4] [--finetune-size 128]
                                      [--no-finetune] [--cache DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import skada
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skt import FeatureExtractor, FineTuneClassifier
from skt.bench import downsample, format_machine, machine_info
from skt.datasets import load_elpv

SOURCE, TARGET = 1, -2  # skada's sample_domain: positive source, negative target


def _head() -> LogisticRegression:
    return LogisticRegression(max_iter=3000, class_weight="balanced")


def _rows(cache: str, args) -> dict:
    """name -> (kind, make): kind says what the row is fitted on."""
    features = lambda: FeatureExtractor(cache=cache)  # noqa: E731
    rows = {
        "raw pixels + LR": ("pixels", lambda: make_pipeline(StandardScaler(), _head())),
        "features + LR (no adaptation)":
            ("source", lambda: make_pipeline(features(), StandardScaler(), _head())),
        "features + CORAL (skada)": ("adapt", lambda: skada.make_da_pipeline(
            features(), StandardScaler(), skada.CORALAdapter(), _head())),
        "features + subspace alignment (skada)": ("adapt", lambda: skada.make_da_pipeline(
            features(), StandardScaler(),
            skada.SubspaceAlignmentAdapter(n_components=64, random_state=0), _head())),
        "features + discriminator reweighting (skada)": ("adapt", lambda: skada.make_da_pipeline(
            features(), StandardScaler(), skada.DiscriminatorReweight(
                base_estimator=_head().set_fit_request(sample_weight=True)))),
    }
    if args.finetune_epochs:
        def tuned(**params):
            return lambda: FineTuneClassifier(
                image_size=args.finetune_size, max_iter=args.finetune_epochs,
                augment="dihedral", class_weight="balanced", random_state=0, **params)

        rows["fine-tuned, source only"] = ("source", tuned())
        rows["fine-tuned + Deep CORAL"] = ("adapt", tuned(domain_adaptation="coral"))
        rows["fine-tuned + DANN"] = ("adapt", tuned(domain_adaptation="dann"))
    rows["oracle: features + LR on target labels"] = (
        "oracle", lambda: make_pipeline(features(), StandardScaler(), _head()))
    return rows


def _positive_scores(model, X, **params) -> np.ndarray:
    if hasattr(model, "predict_proba"):
        return model.predict_proba(X, **params)[:, 1]
    return model.decision_function(X, **params)


def _direction(elpv, source_type: str, cache: str, args) -> list[dict]:
    paths = np.asarray(elpv.images)
    source = np.flatnonzero(elpv.cell_type == source_type)
    target = np.flatnonzero(elpv.cell_type != source_type)
    adapt, test = train_test_split(target, test_size=0.5, stratify=elpv.target[target],
                                   random_state=0)
    y = elpv.target
    results = []
    for name, (kind, make) in _rows(cache, args).items():
        model, start = make(), time.perf_counter()
        params = {}
        if kind == "pixels":
            model.fit(downsample(list(paths[source])), y[source])
            X_test = downsample(list(paths[test]))
        elif kind == "source":
            model.fit(list(paths[source]), y[source])
            X_test = list(paths[test])
        elif kind == "oracle":
            model.fit(list(paths[adapt]), y[adapt])
            X_test = list(paths[test])
        else:
            both = np.r_[source, adapt]
            sample_domain = np.r_[np.full(len(source), SOURCE), np.full(len(adapt), TARGET)]
            model.fit(list(paths[both]), np.r_[y[source], np.full(len(adapt), -1)],
                      sample_domain=sample_domain)
            X_test = list(paths[test])
            if not isinstance(model, FineTuneClassifier):
                params = {"sample_domain": np.full(len(test), TARGET)}
        fit = time.perf_counter() - start
        predicted = model.predict(X_test, **params)
        results.append({
            "row": name, "accuracy": accuracy_score(y[test], predicted),
            "balanced": balanced_accuracy_score(y[test], predicted),
            "roc_auc": roc_auc_score(y[test], _positive_scores(model, X_test, **params)),
            "fit_seconds": fit})
        print(f"  {name:<46} {results[-1]['accuracy']:.3f} {results[-1]['balanced']:.3f} "
              f"{results[-1]['roc_auc']:.3f} {fit:7.1f}", flush=True)
    return results


def _verdict(results: list[dict], direction: str) -> None:
    """Say plainly which adaptations beat their unadapted counterpart (balanced accuracy)."""
    by = {row["row"]: row for row in results}
    pairs = [("features + LR (no adaptation)", name) for name in by
             if name.startswith("features + ") and "(skada)" in name]
    pairs += [("fine-tuned, source only", name) for name in by
              if name.startswith("fine-tuned + ")]
    for baseline, adapted in pairs:
        gain = by[adapted]["balanced"] - by[baseline]["balanced"]
        verdict = "helps" if gain > 0.01 else "hurts" if gain < -0.01 else "changes nothing"
        print(f"  {direction}: {adapted} {verdict} ({gain:+.3f} balanced accuracy against "
              f"{baseline})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--finetune-size", type=int, default=128)
    parser.add_argument("--no-finetune", dest="finetune_epochs", action="store_const", const=0)
    parser.add_argument("--cache", help="feature cache folder (default: a temporary one)")
    args = parser.parse_args()

    sklearn.set_config(enable_metadata_routing=True)  # the reweighting's sample_weight
    print(format_machine(machine_info()))
    elpv = load_elpv(return_paths=True)
    cache = args.cache or tempfile.mkdtemp(prefix="skt-bench-domain-")
    everything = {}
    for source_type, target_type in (("mono", "poly"), ("poly", "mono")):
        direction = f"{source_type} -> {target_type}"
        n_source = int(np.sum(elpv.cell_type == source_type))
        print(f"\n{direction}: {n_source} labelled source cells; target split in halves "
              f"(adaptation, unlabelled / test)")
        print(f"  {'row':<46} {'acc':>5} {'bal':>5} {'auc':>5} {'fit s':>7}")
        everything[direction] = _direction(elpv, source_type, cache, args)
    print()
    for direction, results in everything.items():
        _verdict(results, direction)


if __name__ == "__main__":
    main()
