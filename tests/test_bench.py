"""skt.bench: the harness, and skt.bench.demo (one quick run on real ELPV images)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier

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
    plot_learning_curve,
    run_comparison,
    run_learning_curve,
    score_predictions,
    write_learning_curve,
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


# --------------------------------------------------------- learning curve --

@pytest.fixture
def numbered(rng):
    """60 gray 8x8 noise images whose top-left pixel is their index; 12 "rare", 48 "common"."""
    X = rng.integers(0, 256, (60, 8, 8), dtype=np.uint8)
    X[:, 0, 0] = np.arange(60)
    y = np.where(np.arange(60) % 5 == 0, "rare", "common")
    return X, y


class Recorder(DummyClassifier):
    """Records the image numbers (top-left pixels) it is fitted on and predicts for."""

    fitted: ClassVar[list] = []
    predicted: ClassVar[list] = []

    def fit(self, X, y):
        Recorder.fitted.append((sorted(int(image[0, 0]) for image in X), list(y)))
        return super().fit(X, y)

    def predict(self, X):
        Recorder.predicted.append(sorted(int(image[0, 0]) for image in X))
        return super().predict(X)


@pytest.fixture
def recorder():
    Recorder.fitted, Recorder.predicted = [], []
    return Recorder


def test_learning_curve_points_summarise_the_per_seed_accuracies(numbered):
    X, y = numbered
    knn = Row("1-NN on noise", KNeighborsClassifier(1), input="pixels")
    rows = [Row("Majority class", DummyClassifier()), knn]
    results = run_learning_curve(X, y, rows, inputs=[pixel_input(size=None)],
                                 train_sizes=[20, 8], n_seeds=4, random_state=0, verbose=0)
    assert results["protocol"]["sizes"] == [8, 20]
    assert (results["protocol"]["n_train"], results["protocol"]["n_test"]) == (45, 15)
    assert [m["name"] for m in results["methods"]] == ["Majority class", "1-NN on noise"]
    assert json.loads(json.dumps(results)) == results
    pixels = downsample(X, size=None)
    test = np.array(results["test_indices"])
    for method, estimator in zip(results["methods"], (DummyClassifier(), KNeighborsClassifier(1)),
                                 strict=True):
        assert [p["size"] for p in method["points"]] == [8, 20]
        for point in method["points"]:
            accuracies = point["accuracies"]
            assert len(accuracies) == 4
            assert point["mean"] == pytest.approx(sum(accuracies) / 4, abs=1e-15)
            mean = sum(accuracies) / 4
            std = (sum((a - mean) ** 2 for a in accuracies) / 4) ** 0.5
            assert point["std"] == pytest.approx(std, abs=1e-15)
            assert (point["min"], point["max"]) == (min(accuracies), max(accuracies))
            # each accuracy is that of a fit on the stored subset, scored on the test part
            for subset, accuracy in zip(results["subsets"][str(point["size"])], accuracies,
                                        strict=True):
                fitted = estimator.fit(pixels[subset], y[subset])
                assert accuracy == np.mean(fitted.predict(pixels[test]) == y[test])
    # the nearest neighbour on noise varies between subsets, so the spread is not zero
    assert results["methods"][1]["points"][0]["std"] > 0
    # the majority class is "common" in every subset: 12 of the 15 test images
    assert all(p["accuracies"] == [0.8] * 4 for p in results["methods"][0]["points"])
    assert results["protocol"]["majority_accuracy"] == 0.8


def test_learning_curve_subsets_have_the_size_and_every_class(numbered, recorder):
    X, y = numbered
    results = run_learning_curve(X, y, [Row("recorder", recorder())], train_sizes=[2, 5, 20],
                                 n_seeds=3, random_state=0, verbose=0)
    train = sorted(set(range(60)) - set(results["test_indices"]))
    assert len(train) == 45 and sum(y[train] == "rare") == 9
    sizes = [len(images) for images, _ in recorder.fitted]
    assert sizes == [2, 2, 2, 5, 5, 5, 20, 20, 20]
    for (images, labels), size in zip(recorder.fitted, sizes, strict=True):
        assert set(images) <= set(train)
        assert list(y[images]) == labels
        # one image of each class, then (size - 2) shared in proportion to the 8 spare rare
        # and 35 spare common ones, largest remainder first: 5 -> 0.56 and 2.44 more
        assert labels.count("rare") == {2: 1, 5: 2, 20: 4}[size]
    assert [images for images, _ in recorder.fitted] == [
        subset for size in ("2", "5", "20") for subset in results["subsets"][size]]
    for size in ("2", "5", "20"):  # three different subsets per size
        assert len({tuple(subset) for subset in results["subsets"][size]}) == 3
    again = run_learning_curve(X, y, [Row("m", DummyClassifier())], train_sizes=[20], n_seeds=3,
                               random_state=0, verbose=0)
    assert again["subsets"]["20"] == results["subsets"]["20"]  # drawn per size and seed


def test_learning_curve_tests_on_the_split_of_run_comparison(numbered, recorder):
    X, y = numbered
    strata = np.arange(60) % 3
    for seed in (0, 7):
        recorder.predicted.clear()
        run_comparison(X, y, [Row("recorder", recorder())], stratify=strata, random_state=seed,
                       verbose=0)
        curve = run_learning_curve(X, y, [Row("recorder", recorder())], train_sizes=[10],
                                   n_seeds=2, stratify=strata, random_state=seed, verbose=0)
        comparison_test, *curve_tests = recorder.predicted
        assert curve_tests == [comparison_test, comparison_test] == [curve["test_indices"]]*2
        assert len(comparison_test) == 15


def test_learning_curve_clips_sizes_to_the_training_part(numbered, capsys):
    X, y = numbered
    results = run_learning_curve(X, y, [Row("m", DummyClassifier())],
                                 train_sizes=[10, 1000, "all"], n_seeds=2, random_state=0)
    out = capsys.readouterr().out
    assert out.startswith("Machine: ")
    assert "Size 1000 is more than the 45 training images: using all 45." in out
    assert results["protocol"]["requested_sizes"] == [10, 1000, "all"]
    assert results["protocol"]["sizes"] == [10, 45]
    assert [p["size"] for p in results["methods"][0]["points"]] == [10, 45]
    train = sorted(set(range(60)) - set(results["test_indices"]))
    assert results["subsets"]["45"] == [train, train]
    assert "|        45 (all) |" in out and "|              10 |" in out


def test_learning_curve_reseeds_the_estimator_and_charges_the_input(numbered, tmp_path):
    X, y = numbered
    extractor = FeatureExtractor(**TINY, cache=tmp_path)
    rows = [Row("SGD", SGDClassifier(random_state=3), input="pixels"),
            *feature_rows(extractor, input="tiny", cv=2, heads=("logreg",), label="tiny")]
    inputs = [pixel_input(size=None), feature_input(extractor, name="tiny")]
    results = run_learning_curve(X, y, rows, inputs=inputs, train_sizes=[6], n_seeds=2,
                                 random_state=0, verbose=0)
    sgd, features = results["methods"]
    assert sgd["points"][0]["random_states"] == [3, 4]  # its own seed, plus the repeat
    assert features["points"][0]["random_states"] == [None, None]  # a search: left alone
    assert cache_info(tmp_path)["entries"] == 60  # every image extracted once, before the fits
    seconds = results["inputs"]["tiny"]["seconds"]
    point = features["points"][0]
    assert point["input_fit_seconds"] == pytest.approx(seconds * 6 / 60, rel=1e-12)
    assert point["fit_seconds"] == pytest.approx(
        np.mean(point["fit_seconds_per_seed"]), rel=1e-12)
    assert min(point["fit_seconds_per_seed"]) > point["input_fit_seconds"]


def test_learning_curve_rejects_bad_sizes_seeds_and_inputs(numbered):
    X, y = numbered
    row = Row("m", DummyClassifier())
    with pytest.raises(ValueError, match="cannot hold one image of each of the 2 classes"):
        run_learning_curve(X, y, [row], train_sizes=[1, 10], n_seeds=2, verbose=0)
    with pytest.raises(ValueError, match="whole numbers of images or 'all'"):
        run_learning_curve(X, y, [row], train_sizes=[0.5], n_seeds=2, verbose=0)
    with pytest.raises(ValueError, match="n_seeds=0"):
        run_learning_curve(X, y, [row], train_sizes=[10], n_seeds=0, verbose=0)
    with pytest.raises(ValueError, match=r"inputs \['pixels'\]"):
        run_learning_curve(X, y, [Row("r", DummyClassifier(), input="pixels")],
                           train_sizes=[10], n_seeds=2, verbose=0)


def test_write_learning_curve_table_json_and_chart(numbered, tmp_path):
    require("matplotlib", "pip install matplotlib")
    X, y = numbered
    rows = [Row("Majority class", DummyClassifier()),
            Row("1-NN", KNeighborsClassifier(1), input="pixels")]
    results = run_learning_curve(X, y, rows, inputs=[pixel_input(size=None)],
                                 train_sizes=[4, 12, "all"], n_seeds=3, verbose=0,
                                 dataset={"name": "Toy"}, title="Toy curve")
    paths = write_learning_curve(results, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "curve.json", "curve.md", "curve.png"]
    assert json.loads(paths["json"].read_text()) == results
    lines = paths["markdown"].read_text().splitlines()
    assert lines[0] == "### Toy curve"
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:7]]
    assert table[0] == ["training images", "Majority class", "1-NN"]
    assert set("".join(table[1])) == {"-", ":"}
    assert [line[0] for line in table[2:]] == ["4", "12", "45 (all)"]
    knn = results["methods"][1]["points"]
    assert [line[2] for line in table[2:]] == [
        f"{np.mean(p['accuracies']):.3f} ± {np.std(p['accuracies']):.3f}" for p in knn]
    assert table[4][1] == "0.800 ± 0.000"
    assert "Data: Toy." in lines and "mean ± standard deviation over 3" in lines[8]
    assert lines[8].endswith("Always predicting the most frequent training class scores 0.800.")
    assert paths["chart"].read_bytes()[:8] == PNG_MAGIC
    assert plot_learning_curve(results, tmp_path / "curve.svg").read_text().startswith("<?xml")


def test_format_machine_names_the_instruction_sets():
    from skt.bench import format_machine

    info = {"cpu": "Some CPU", "instruction_sets": ["avx2", "avx512_vnni"], "cpu_cores": 2,
            "torch_threads": 2, "device": "cpu", "load_average": [0.5, 0, 0], "torch": "2.x",
            "torchvision": "0.x", "scikit-learn": "1.x", "skt": "0.1"}
    assert format_machine(info) == (
        "Machine: Some CPU (avx2 avx512_vnni), 2 CPU cores, 2 torch threads, device cpu, load "
        "average 0.5; torch 2.x, torchvision 0.x, scikit-learn 1.x, skt 0.1")
    flags = machine_info()["instruction_sets"]
    assert isinstance(flags, list) and all(isinstance(flag, str) for flag in flags)


def test_format_machine_names_the_huge_page_mode():
    from skt.bench import format_machine

    info = {"cpu": "Some CPU", "instruction_sets": [], "cpu_cores": 2, "torch_threads": 2,
            "device": "cpu", "load_average": None, "huge_pages": "madvise, torch asks",
            "torch": "2.x", "torchvision": "0.x", "scikit-learn": "1.x", "skt": "0.1"}
    assert format_machine(info) == (
        "Machine: Some CPU, 2 CPU cores, 2 torch threads, device cpu, huge pages madvise, "
        "torch asks; torch 2.x, torchvision 0.x, scikit-learn 1.x, skt 0.1")
    mode = machine_info()["huge_pages"]
    assert mode.split(", ")[0] in ("always", "madvise", "never", "unknown")
    assert mode.endswith(("torch asks", "torch does not ask"))
