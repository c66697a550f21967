"""skt.transferability: each score against a hand computation, and as a search's scorer."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import multivariate_normal
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from skt import FeatureExtractor, make_transferability_scorer
from skt.transferability import hscore, leep, logme, nce, rank_backbones
from tests.conftest import TINY


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 40)
    separable = rng.normal(size=(120, 6)) + 2.5 * np.eye(3, 6)[y]
    return separable, y, rng


def _closed_form_log_evidence(F: np.ndarray, t: np.ndarray, log_alpha: float,
                              log_beta: float) -> float:
    """log N(t; 0, I / beta + F F^T / alpha): the evidence, written out."""
    cov = np.eye(len(t)) / np.exp(log_beta) + F @ F.T / np.exp(log_alpha)
    return multivariate_normal(mean=np.zeros(len(t)), cov=cov).logpdf(t)


def test_logme_is_the_maximised_closed_form_evidence_in_one_dimension():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 15)
    F = (rng.normal(size=30) + 1.5 * y)[:, None]
    expected = 0.0
    for k in (0, 1):
        t = (y == k).astype(float)
        best = minimize(lambda p, t=t: -_closed_form_log_evidence(F, t, *p), x0=[0.0, 0.0],
                        method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-10})
        expected += -best.fun
    assert logme(F, y, tol=1e-10, max_iter=10_000) == pytest.approx(expected / (2 * 30),
                                                                       rel=1e-6)


def test_hscore_is_its_definition_with_explicit_covariances(data):
    F, y, _ = data
    cov_f = np.cov(F.T, bias=True)
    conditional_means = np.stack([F[y == label].mean(axis=0) for label in y])
    cov_g = np.cov(conditional_means.T, bias=True)
    assert hscore(F, y) == pytest.approx(np.trace(np.linalg.inv(cov_f) @ cov_g), rel=1e-10)
    assert 0 < hscore(F, y) <= 2 + 1e-9  # at most n_classes - 1


def test_leep_and_nce_by_hand_on_a_small_table():
    theta = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    y = np.array(["a", "a", "b", "a"])
    joint = np.array([[0.9 + 0.6 + 0.3, 0.1 + 0.4 + 0.7], [0.2, 0.8]]) / 4  # rows: a, b
    conditional = joint / joint.sum(axis=0)
    rows = [0, 0, 1, 0]
    expected = np.mean([np.log(theta[i] @ conditional[rows[i]]) for i in range(4)])
    assert leep(theta, y) == pytest.approx(expected, rel=1e-12)

    z = theta.argmax(axis=1)  # 0, 0, 1, 1
    # P(a|0) = 1; P(a|1) = P(b|1) = 1/2; joint 2/4, 1/4, 1/4
    assert nce(z, y) == pytest.approx(0.25 * np.log(0.5) * 2, rel=1e-12)


@pytest.mark.parametrize("metric", ["logme", "hscore"])
def test_feature_scores_ignore_class_names_and_prefer_true_labels(data, metric):
    F, y, rng = data
    score = {"logme": logme, "hscore": hscore}[metric]
    renamed = np.array(["c", "a", "b"])[y]
    assert score(F, renamed) == pytest.approx(score(F, y), rel=1e-12)
    assert score(F, y) > score(F, rng.permutation(y)) + 0.1


@pytest.mark.parametrize("metric", ["leep", "nce"])
def test_label_scores_ignore_class_names_and_prefer_true_labels(data, metric):
    F, y, rng = data
    theta = np.exp(F[:, :3]) / np.exp(F[:, :3]).sum(axis=1, keepdims=True)
    source = theta if metric == "leep" else theta.argmax(axis=1)
    score = {"leep": leep, "nce": nce}[metric]
    assert score(source, np.array(["c", "a", "b"])[y]) == pytest.approx(score(source, y))
    assert score(source, y) > score(source, rng.permutation(y)) + 0.1


def test_bad_inputs_name_what_is_wrong(data):
    F, y, _ = data
    with pytest.raises(ValueError, match=r"y must hold one label per row: 120 rows, but y "
                                         r"has shape \(119,\)"):
        logme(F, y[:-1])
    with pytest.raises(ValueError, match="y has a single class"):
        hscore(F, np.zeros(120))
    with pytest.raises(ValueError, match="features holds NaN or infinite values"):
        logme(np.where(np.eye(120, 6) > 0, np.nan, F), y)
    with pytest.raises(ValueError, match="rows of probabilities summing to 1"):
        leep(F[:, :3], y)
    with pytest.raises(ValueError, match="metric must be one of"):
        make_transferability_scorer("accuracy")


def test_the_scorer_ranks_layers_in_a_search_without_a_head(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 120, (24, 32, 32, 3), dtype=np.uint8)
    y = np.repeat([0, 1], 12)
    X[y == 1, :, :16] += 120  # class 1: a bright left half
    search = GridSearchCV(FeatureExtractor(**TINY, cache=tmp_path),
                          {"layers": ["layer1", "layer4"], "pooling": ["avg", "max"]},
                          cv=StratifiedKFold(2), scoring=make_transferability_scorer("logme"),
                          error_score="raise").fit(X, y)
    scores = dict(zip([(p["layers"], p["pooling"]) for p in search.cv_results_["params"]],
                      search.cv_results_["mean_test_score"], strict=True))
    # layer4 of a 32 px crop is 1 x 1: its avg and max pooling are the same features
    assert scores["layer4", "avg"] == pytest.approx(scores["layer4", "max"])
    assert scores["layer1", "avg"] != pytest.approx(scores["layer1", "max"])
    # the shallow layer sees the bright half; measured 1.78 against 0.53 for layer4
    assert search.best_params_ == {"layers": "layer1", "pooling": "avg"}
    extractor = FeatureExtractor(**TINY, layers="layer1").fit(X)
    assert make_transferability_scorer("logme")(extractor, X, y) == pytest.approx(
        logme(extractor.transform(X), y))
    # H-score with 24 images and 64 dimensions: saturated at n_classes - 1, as documented
    assert hscore(extractor.transform(X), y) == pytest.approx(1.0)


def _controls():
    return [FeatureExtractor(name, weights=None, image_size=32, random_state=0, engine="torch")
            for name in ("resnet18", "mobilenet_v3_small")]


@pytest.fixture
def striped():
    rng = np.random.default_rng(0)
    X = rng.integers(0, 120, (20, 32, 32, 3), dtype=np.uint8)
    y = np.repeat(["dark", "bright"], 10)
    X[y == "bright", :, :16] += 120
    return X, y


def test_rank_backbones_best_first_with_errors_last(striped, tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    X, y = striped
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no weights on this machine, no network

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    table = rank_backbones(X, y, [*_controls(), "resnet34"], layers=["layer1", "layer4"])
    rows = table.to_dict("records")  # pandas shows a missing error as NaN
    assert [(row["backbone"], row["layer"]) for row in rows][-2:] == [
        ("resnet34", "layer1"), ("resnet34", "layer4")]
    assert all("WeightsNotFoundError" in row["error"] and "ResNet34_Weights" in row["error"]
               for row in rows[-2:])
    scored = [row for row in rows if not isinstance(row["error"], str)]
    assert [row["backbone"] for row in scored].count("resnet18 (random init)") == 2
    assert all(a["score"] >= b["score"] for a, b in itertools.pairwise(scored))
    # mobilenet_v3_small has no layer1 or layer4: its rows say so (errors keep their order)
    unknown = [row for row in rows if row["backbone"].startswith("mobilenet")]
    assert all("layer" in row["error"] for row in unknown)
    expected = logme(_controls()[0].set_params(layers="layer1").fit(X).transform(X), y)
    assert next(row["score"] for row in scored if row["layer"] == "layer1") == pytest.approx(
        expected)


def test_rank_backbones_without_pandas_and_with_a_bad_y(striped, monkeypatch):
    X, y = striped
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    rows = rank_backbones(X, y, _controls()[:1])
    assert isinstance(rows, list) and rows[0]["layer"] == "pre_logits"
    assert rows[0]["error"] is None and np.isfinite(rows[0]["score"])
    with pytest.raises(ValueError, match="y must hold one label per row: 20 rows"):
        rank_backbones(X, y[:5], _controls()[:1])
    with pytest.raises(ValueError, match="metric must be 'logme' or 'hscore'"):
        rank_backbones(X, y, _controls()[:1], metric="leep")


def test_skt_rank_prints_backbones_best_first(image_folder, capsys):
    from skt.cli import main

    status = main(["rank", str(image_folder), "--backbones", "efficientnet_lite0",
                   "--layers", "blocks.2,pre_logits", "--image-size", "32"])
    out = capsys.readouterr().out.splitlines()
    assert status == 0 and out[0].split() == ["backbone:layer", "logme", "seconds"]
    names = [line.split()[0] for line in out[1:]]
    assert sorted(names) == ["efficientnet_lite0:blocks.2", "efficientnet_lite0:pre_logits"]
    scores = [float(line.split()[1]) for line in out[1:]]
    assert scores == sorted(scores, reverse=True)


def test_skt_rank_needs_class_folders(image_files, capsys):
    from skt.cli import main

    assert main(["rank", *image_files[:4]]) == 1
    assert capsys.readouterr().err.startswith("skt: error: skt rank needs labels: give a "
                                              "folder with one subfolder per class")
