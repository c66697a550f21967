"""skt.bench: the harness, and skt.bench.demo (one quick run on real ELPV images)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from skt import FeatureExtractor, cache_info
from skt.bench import (
    METRICS,
    Input,
    Reference,
    Row,
    compare_with_imagenet,
    downsample,
    feature_input,
    feature_rows,
    format_imagenet_comparison,
    format_table,
    imagenet_top1,
    machine_info,
    markdown_table,
    pixel_input,
    pixel_rows,
    run_comparison,
    score_predictions,
    write_results,
)

from .conftest import TINY, require

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------ quick demo --

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One ``run_demo(quick=True)``; returns (results, output folder)."""
    require("elpv_dataset", "pip install elpv-dataset")
    require("matplotlib", "pip install matplotlib")
    from skt.bench.demo import run_demo

    output = tmp_path_factory.mktemp("demo")
    return run_demo(quick=True, output=output, verbose=0), output


def _quick_split():
    """The quick demo's split, redone by hand from the documented protocol."""
    from skt.bench.demo import QUICK_SETTINGS, SEED
    from skt.datasets import load_elpv, subsample

    elpv = subsample(load_elpv(return_paths=True), QUICK_SETTINGS.n_images, random_state=SEED)
    strata = [f"{p:.2f}|{t}" for p, t in zip(elpv.probability, elpv.cell_type, strict=True)]
    train, test = train_test_split(np.arange(len(elpv.target)), test_size=0.25,
                                   stratify=strata, random_state=SEED)
    return elpv.target[train], elpv.target[test]


def _rows(results, group):
    return [row for row in results["rows"] if row["group"] == group]


@pytest.mark.pretrained
def test_demo_writes_json_markdown_and_chart(demo):
    results, output = demo
    saved = json.loads((output / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    markdown = (output / "results.md").read_text()
    for row in results["rows"]:
        assert f"| {row['name']} |" in markdown
    assert "|---|---:|" in markdown
    assert "Deitsch et al., 2019" in markdown and "not measured here" in markdown
    assert (output / "results.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.pretrained
def test_demo_rows_and_columns(demo):
    results, _ = demo
    names = [row["name"] for row in results["rows"]]
    assert len(names) == 8 and names[0] == "Majority class"
    assert len(_rows(results, "raw pixels")) == 3
    assert len(_rows(results, "efficientnet_lite0")) == 3
    assert [row["name"] for row in _rows(results, "fine-tuned")] == [
        "Lite0 fine-tuned (1 epoch, 64 px)"]
    for row in results["rows"]:
        assert set(row["metrics"]) == set(METRICS)
        assert all(0.0 <= value <= 1.0 for value in row["metrics"].values()), row["name"]
    searched = [row for row in results["rows"] if row["group"] in ("raw pixels",
                                                                    "efficientnet_lite0")]
    assert all(row["best_params"][0] for row in searched)


@pytest.mark.pretrained
def test_demo_majority_accuracy_is_the_test_class_ratio(demo):
    results, _ = demo
    y_train, y_test = _quick_split()
    majority = np.bincount(y_train).argmax()
    expected = np.mean(y_test == majority)
    row = results["rows"][0]
    assert row["metrics"]["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert row["metrics"]["balanced_accuracy"] == pytest.approx(0.5)
    assert row["metrics"]["roc_auc"] == pytest.approx(0.5)
    assert results["protocol"]["n_train"] == [len(y_train)]
    assert results["protocol"]["n_test"] == [len(y_test)]


@pytest.mark.pretrained
def test_demo_lite0_features_beat_majority_class(demo):
    results, _ = demo
    majority = results["rows"][0]["metrics"]
    for row in _rows(results, "efficientnet_lite0"):
        assert row["metrics"]["accuracy"] > majority["accuracy"] + 0.03, row["name"]
        assert row["metrics"]["balanced_accuracy"] > 0.6, row["name"]
        assert row["metrics"]["roc_auc"] > 0.7, row["name"]


@pytest.mark.pretrained
def test_demo_records_data_protocol_and_machine(demo):
    results, output = demo
    assert results["dataset"]["n_images"] == 400
    assert sum(results["dataset"]["class_counts"].values()) == 400
    assert "CC BY-NC-SA 4.0" in results["dataset"]["licence"]
    assert results["protocol"]["random_state"] == 0
    assert results["settings"]["quick"] is True
    assert results["machine"]["cpu_cores"] >= 1
    assert results["machine"]["torch_threads"] >= 1
    assert [ref["accuracy"] for ref in results["references"]] == [0.8244, 0.8842]
    assert "efficientnet_lite0" in results["inputs"]
    # the extractor's features for all 400 images are in the cache inside the output folder
    assert cache_info(output / "cache")["entries"] == 400


@pytest.mark.pretrained
def test_demo_charges_each_row_its_share_of_the_input_time(demo):
    results, _ = demo
    assert [row["input"] for row in results["rows"]] == [
        "images", *["pixels"] * 3, *["efficientnet_lite0"] * 3, "images"]
    assert set(results["inputs"]) == {"pixels", "efficientnet_lite0"}
    (n_train,), (n_test,) = results["protocol"]["n_train"], results["protocol"]["n_test"]
    for row in results["rows"]:
        seconds = results["inputs"].get(row["input"], {"seconds": 0.0})["seconds"]
        assert row["input_fit_seconds"] == pytest.approx(seconds * n_train / 400, rel=1e-12)
        assert row["input_predict_seconds"] == pytest.approx(seconds * n_test / 400, rel=1e-12)
        # one split: the row's times are its fold's, and they include the input's share
        (fold,) = row["folds"]
        assert row["fit_seconds"] == fold["fit_seconds"] >= fold["input_fit_seconds"]
        assert row["predict_seconds"] == fold["predict_seconds"] >= fold["input_predict_seconds"]


# ---------------------------------------------------------------- scoring --

def test_score_predictions_binary_decision_values_equal_probabilities():
    y = np.array([0, 0, 1, 1, 1, 0])
    decision = np.array([-2.0, 0.5, 1.0, 3.0, -0.1, -1.0])
    proba = 1 / (1 + np.exp(-decision))
    predicted = (decision > 0).astype(int)
    from_decision = score_predictions(y, predicted, decision, [0, 1])
    from_proba = score_predictions(y, predicted, np.c_[1 - proba, proba], [0, 1])
    assert from_decision == from_proba
    assert from_decision["accuracy"] == pytest.approx(4 / 6)
    assert from_decision["roc_auc"] == pytest.approx(roc_auc_score(y, decision))


def test_score_predictions_multiclass_matches_sklearn_ovr(rng):
    y = np.tile(["a", "b", "c"], 10)
    proba = rng.dirichlet(np.ones(3), size=30)
    predicted = np.array(["a", "b", "c"])[proba.argmax(1)]
    metrics = score_predictions(y, predicted, proba, ["a", "b", "c"])
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr"))
    assert metrics["f1_macro"] <= 1.0


@pytest.mark.filterwarnings("ignore:A single label was found")
def test_score_predictions_without_scores_or_with_one_class_has_no_auc():
    assert np.isnan(score_predictions([0, 1], [0, 1], None, [0, 1])["roc_auc"])
    assert np.isnan(score_predictions([1, 1], [1, 1], np.array([0.9, 0.2]), [0, 1])["roc_auc"])


# ------------------------------------------------------------- downsample --

def test_downsample_keeps_one_channel_for_gray_and_three_for_colour(images):
    gray = np.repeat(images[..., :1], 3, axis=3)
    assert downsample(gray, size=8).shape == (8, 64)
    colour = downsample(images, size=8)
    assert colour.shape == (8, 192)
    assert colour.dtype == np.float32 and 0 <= colour.min() and colour.max() <= 1


def test_downsample_files_equal_arrays(images, image_files):
    np.testing.assert_allclose(downsample(image_files, size=16), downsample(images, size=16),
                               atol=1e-6)


def test_downsample_as_is_needs_one_size(images):
    flat = downsample(images, size=None)
    np.testing.assert_allclose(flat[0], (images[0].transpose(2, 0, 1) / 255).ravel(), atol=1e-6)
    with pytest.raises(ValueError, match="Image 1 is .* pass a size"):
        downsample([images[0], images[1, :20]], size=None)


# ----------------------------------------------------------------- engine --

@pytest.fixture
def separable(rng):
    """60 gray 8x8 images in two classes that differ in brightness, labels as strings."""
    y = np.repeat(["dark", "light"], 30)
    X = rng.integers(0, 120, (60, 8, 8), dtype=np.uint8)
    X[y == "light"] += 120
    return X, y


def test_run_comparison_single_split(separable):
    X, y = separable
    rows = [Row("Majority class", DummyClassifier()),
            Row("pixels + logreg", LogisticRegression(), input="pixels")]
    results = run_comparison(X, y, rows, inputs=[pixel_input(size=None)], test_size=0.25,
                             random_state=0, verbose=0)
    assert results["protocol"]["n_train"] == [45] and results["protocol"]["n_test"] == [15]
    majority, logreg = results["rows"]
    assert majority["metrics"]["balanced_accuracy"] == 0.5
    assert logreg["metrics"] == {"accuracy": 1.0, "balanced_accuracy": 1.0, "f1_macro": 1.0,
                                 "roc_auc": 1.0}
    json.dumps(results)  # JSON-ready, strings and all


def test_run_comparison_cross_validation_covers_every_image_once(separable):
    X, y = separable
    seen = []

    class Recorder(DummyClassifier):
        def predict(self, X):
            seen.append(len(X))
            return super().predict(X)

    results = run_comparison(X, y, [Row("recorder", Recorder())], cv=4, random_state=0,
                             verbose=0)
    row = results["rows"][0]
    assert len(row["folds"]) == 4 and sum(seen) == 60
    assert results["protocol"]["n_test"] == [15, 15, 15, 15]
    assert set(row["metrics_std"]) == set(METRICS)
    assert "±" in format_table(results)


def test_run_comparison_fixed_split(separable):
    X, y = separable
    split = (np.arange(0, 60, 2), np.arange(1, 60, 2))
    results = run_comparison(X, y, [Row("m", DummyClassifier())], split=split, verbose=0)
    assert results["protocol"]["kind"] == "fixed split"
    assert results["protocol"]["n_train"] == [30]
    with pytest.raises(ValueError, match="either split"):
        run_comparison(X, y, [Row("m", DummyClassifier())], split=split, cv=3, verbose=0)
    with pytest.raises(ValueError, match="disjoint"):
        run_comparison(X, y, [Row("m", DummyClassifier())], split=(split[0], split[0]),
                       verbose=0)


class FakeClock:
    """Stands in for ``time.perf_counter``: time passes only when a test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def test_inputs_are_computed_once_and_charged_per_image(separable, monkeypatch):
    X, y = separable
    clock = FakeClock()
    monkeypatch.setattr("skt.bench._run.time", SimpleNamespace(perf_counter=clock))
    calls = []

    def prepare(images):
        calls.append(len(images))
        clock.advance(6.0)
        return downsample(images, size=None), "slow pixels"

    class Timed(DummyClassifier):
        """Fitting takes 2 s and predicting 1 s, on the fake clock."""

        def fit(self, X, y):
            clock.advance(2.0)
            return super().fit(X, y)

        def predict(self, X):
            clock.advance(1.0)
            return super().predict(X)

    rows = [Row(f"timed {i}", Timed(), input="slow") for i in range(2)]
    results = run_comparison(X, y, rows, inputs=[Input("slow", prepare)], random_state=0,
                             verbose=0)
    assert calls == [60]
    assert results["inputs"] == {"slow": {"description": "slow pixels", "seconds": 6.0}}
    for row in results["rows"]:  # 45 training and 15 test images of 60
        assert row["input_fit_seconds"] == pytest.approx(6.0 * 45 / 60, rel=1e-12)
        assert row["input_predict_seconds"] == pytest.approx(6.0 * 15 / 60, rel=1e-12)
        assert row["fit_seconds"] == pytest.approx(2.0 + 4.5, rel=1e-12)
        assert row["predict_seconds"] == pytest.approx(1.0 + 1.5, rel=1e-12)
    assert results["wall_seconds"] == 6.0 + 2 * (2.0 + 1.0)


def test_run_comparison_rejects_unknown_inputs_and_label_mismatch(separable):
    X, y = separable
    with pytest.raises(ValueError, match=r"inputs \['pixels'\]"):
        run_comparison(X, y, [Row("r", LogisticRegression(), input="pixels")], verbose=0)
    with pytest.raises(ValueError, match="60 images but 59 labels"):
        run_comparison(X, y[:-1], [Row("r", DummyClassifier())], verbose=0)


def test_verbose_prints_machine_rows_and_references(separable, capsys):
    X, y = separable
    run_comparison(X, y, [Row("Majority class", DummyClassifier())], verbose=1,
                   references=[Reference("Someone's model", 0.9, "a paper")])
    out = capsys.readouterr().out
    assert out.startswith("Machine: ")
    assert "torch threads" in out and "CPU cores" in out
    assert "[1/1] Majority class ..." in out
    assert "Someone's model: 90.00 % accuracy (a paper)" in out


def test_pixel_rows_search_on_the_training_part(separable):
    X, y = separable
    results = run_comparison(X, y, pixel_rows(cv=3), inputs=[pixel_input(size=4)],
                             random_state=0, verbose=0)
    assert [row["name"] for row in results["rows"]] == [
        "Raw pixels + LogisticRegression", "Raw pixels + LinearSVC",
        "Raw pixels + PCA + LinearDiscriminantAnalysis"]
    assert all(row["metrics"]["accuracy"] == 1.0 for row in results["rows"])
    assert results["rows"][0]["best_params"][0]["head__C"] in (0.001, 0.01, 0.1, 1.0)


def test_feature_rows_read_the_cache_filled_by_feature_input(separable, tmp_path):
    X, y = separable
    extractor = FeatureExtractor(**{**TINY, "engine": "torch"}, cache=tmp_path)
    inputs = [feature_input(extractor, name="tiny")]
    rows = feature_rows(extractor, input="tiny", cv=3, heads=("logreg",), label="tiny")
    first = run_comparison(X, y, rows, inputs=inputs, random_state=0, verbose=0)
    assert cache_info(tmp_path)["entries"] == 60
    assert "computed by the torch engine" in first["inputs"]["tiny"]["description"]
    second = run_comparison(X, y, rows, inputs=inputs, random_state=0, verbose=0)
    assert "read from the cache" in second["inputs"]["tiny"]["description"]
    assert second["rows"][0]["metrics"] == first["rows"][0]["metrics"]
    assert first["rows"][0]["backbone"] == "resnet18"
    with pytest.raises(ValueError, match="cache"):
        feature_input(FeatureExtractor(**TINY))
    with pytest.raises(ValueError, match="Unknown heads"):
        feature_rows(extractor, heads=("knn",))


# ----------------------------------------------------------------- output --

def _toy_results(separable, cv=None):
    X, y = separable
    return run_comparison(X, y, [Row("Majority class", DummyClassifier()),
                                 Row("logreg", LogisticRegression(), input="pixels")],
                          inputs=[pixel_input(size=None)], cv=cv, random_state=0, verbose=0,
                          references=[Reference("Published model", 0.95, "a paper")],
                          title="Toy")


def test_markdown_table_is_pasteable(separable):
    markdown = markdown_table(_toy_results(separable))
    lines = markdown.splitlines()
    assert lines[0] == ("| Row | accuracy | balanced acc. | macro-F1 | ROC-AUC | fit s | "
                        "predict s |")
    assert lines[1] == "|---|---:|---:|---:|---:|---:|---:|"
    assert re.match(r"\| Majority class \| 0\.\d{3} \| 0\.500 \| 0\.\d{3} \| 0\.500 \|",
                    lines[2])
    assert lines[3].startswith("| logreg | 1.000 | 1.000 | 1.000 | 1.000 |")
    assert "Published reference, not measured here: Published model: 95.00 %" in markdown


def test_write_results_round_trips_and_writes_null_for_missing_auc(separable, tmp_path):
    results = _toy_results(separable, cv=3)
    results["rows"][0]["metrics"]["roc_auc"] = None  # as run_comparison stores NaN
    paths = write_results(results, tmp_path / "out", chart=True)
    saved = json.loads(paths["json"].read_text())
    assert saved["rows"][0]["metrics"]["roc_auc"] is None
    assert "| Majority class |" in paths["markdown"].read_text()
    assert "n/a" in format_table(saved)
    assert paths["chart"].read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------ machine, ImageNet --

def test_machine_info_names_cores_threads_device_and_versions():
    info = machine_info()
    assert info["cpu_cores"] >= 1 and info["torch_threads"] >= 1
    assert info["device"] in ("cpu", "cuda", "mps")
    assert {"torch", "torchvision", "scikit-learn", "skt"} <= set(info)


def test_imagenet_top1_and_correlation():
    assert [imagenet_top1(f"efficientnet_lite{i}") for i in range(3)] == [75.1, 76.7, 77.6]
    assert imagenet_top1("no_such_network") is None
    rows = [{"backbone": f"efficientnet_lite{i}", "head": "logreg",
             "metrics": {"accuracy": accuracy}} for i, accuracy in enumerate([0.80, 0.82, 0.81])]
    summary = compare_with_imagenet({"rows": rows}, [r["backbone"] for r in rows])
    top1, accuracy = [75.1, 76.7, 77.6], [0.80, 0.82, 0.81]
    assert summary["pearson_r"] == pytest.approx(np.corrcoef(top1, accuracy)[0, 1])
    assert summary["spearman_rho"] == pytest.approx(0.5)
    assert "Pearson r = " in format_imagenet_comparison(summary)
    assert compare_with_imagenet({"rows": rows[:1]}, ["efficientnet_lite0"]) is None
