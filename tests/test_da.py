"""skt features inside skada: DA pipelines on image inputs, searches with skada's splitters
and scorers (through skt.da), and a shift whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skt import FeatureExtractor
from tests.conftest import TINY, require

skada = require("skada", "pip install 'skt[da]'")
from skada.metrics import (  # noqa: E402
    ImportanceWeightedScorer,
    PredictionEntropyScorer,
    SupervisedScorer,
)
from skada.model_selection import SourceTargetShuffleSplit  # noqa: E402

from skt.da import ImageDomainScorer, ImageDomainSplit  # noqa: E402


def _extractor(**params) -> FeatureExtractor:
    return FeatureExtractor(**{**TINY, **params})


def _pipe(cache=None, adapter=None):
    return skada.make_da_pipeline(_extractor(cache=cache), StandardScaler(),
                                  adapter or skada.CORALAdapter(),
                                  LogisticRegression(max_iter=2000))


def _shifted_digits(n_per_domain: int):
    """Digits 0-3 as 32 px crops: source grey, target a low-contrast, bright, tinted camera.

    Source and target are different digits; target labels are only for scoring.
    """
    digits = load_digits()
    keep = digits.target < 4
    images = (digits.images[keep] / 16 * 255).astype(np.uint8)
    labels = digits.target[keep]
    order = np.random.default_rng(0).permutation(len(images))[:2 * n_per_domain]
    images, labels = images[order], labels[order]
    grey = np.stack([images] * 3, axis=-1)
    tinted = (90 + 0.45 * grey.astype(np.float32) * np.array([1.0, 0.8, 0.5])).astype(np.uint8)
    source, target = grey[:n_per_domain], tinted[n_per_domain:]
    return source, labels[:n_per_domain], target, labels[n_per_domain:]


@pytest.fixture(scope="module")
def domains():
    source, y_source, target, y_target = _shifted_digits(200)
    X = np.concatenate([source, target])
    sample_domain = np.r_[np.ones(len(source), int), np.full(len(target), -2)]
    y_masked = np.r_[y_source, np.full(len(target), -1)]
    return X, y_masked, sample_domain, target, y_target


def test_coral_and_subspace_alignment_beat_no_adaptation_on_a_known_shift(domains, tmp_path):
    X, y_masked, sample_domain, target, y_target = domains
    source = sample_domain > 0
    unadapted = make_pipeline(_extractor(cache=tmp_path), StandardScaler(),
                              LogisticRegression(max_iter=2000)).fit(X[source], y_masked[source])
    baseline = np.mean(unadapted.predict(target) == y_target)
    scores = {}
    for name, adapter in (("coral", skada.CORALAdapter()),
                          ("subspace", skada.SubspaceAlignmentAdapter(n_components=20))):
        pipe = _pipe(tmp_path, adapter).fit(X, y_masked, sample_domain=sample_domain)
        scores[name] = np.mean(pipe.predict(target, sample_domain=np.full(len(target), -2))
                               == y_target)
    # Measured: 0.40 without adaptation, 0.69 with CORAL, 0.83 with subspace alignment
    # (random-init ResNet-18 features; four classes, chance 0.25).
    assert baseline < 0.55
    assert scores["coral"] > baseline + 0.15 and scores["subspace"] > baseline + 0.25, scores


@pytest.fixture
def small(tmp_path):
    """20 images (10 source, 10 target) as PNG paths, arrays and PIL images."""
    X = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    paths = []
    for i, image in enumerate(X):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    sample_domain = np.r_[np.ones(10, int), np.full(10, -2)]
    y = np.r_[np.tile([0, 1], 5), np.full(10, -1)]
    return {"array": X, "paths": paths, "PIL": [Image.fromarray(a) for a in X]}, y, sample_domain


def test_da_pipeline_fits_and_predicts_on_every_kind_of_image_input(small):
    inputs, y, sample_domain = small
    predictions = {}
    for kind, X in inputs.items():
        pipe = _pipe().fit(X, y, sample_domain=sample_domain)
        predictions[kind] = pipe.predict(X[10:])  # without sample_domain: target, as skada assumes
        assert set(predictions[kind]) <= {0, 1}
    np.testing.assert_array_equal(predictions["paths"], predictions["array"])
    np.testing.assert_array_equal(predictions["PIL"], predictions["array"])


def _search(X, y, sample_domain, cv, scoring, cache=None, **fit_params):
    grid = {"coraladapter__reg": [0.01, 1.0], "featureextractor__pooling": ["avg", "max"]}
    return GridSearchCV(_pipe(cache), grid, cv=cv, scoring=scoring).fit(
        X, y, sample_domain=sample_domain, **fit_params)


def test_skada_splitters_and_scorers_refuse_paths_and_skt_da_wraps_them(small):
    inputs, y, sample_domain = small
    split = SourceTargetShuffleSplit(n_splits=2, random_state=0)
    # skada checks X as an array: a list of paths is 1-D (this is what skt.da is for).
    with pytest.raises(ValueError, match="Expected 2D array, got 1D array"):
        _search(inputs["paths"], y, sample_domain, split, PredictionEntropyScorer())

    on_paths = _search(inputs["paths"], y, sample_domain, ImageDomainSplit(split),
                       ImageDomainScorer(PredictionEntropyScorer()))
    on_array = _search(inputs["array"], y, sample_domain, split, PredictionEntropyScorer())
    assert on_paths.best_params_ == on_array.best_params_
    np.testing.assert_allclose(on_paths.cv_results_["mean_test_score"],
                               on_array.cv_results_["mean_test_score"])
    assert np.all(on_paths.cv_results_["mean_test_score"] < 0)  # minus the entropy
    assert on_paths.predict(inputs["paths"][10:]).shape == (10,)


def test_supervised_scorer_with_target_labels_on_images(small):
    import sklearn

    inputs, y, sample_domain = small
    target_labels = np.r_[y[:10], np.tile([1, 0], 5)]
    split = ImageDomainSplit(SourceTargetShuffleSplit(n_splits=2, random_state=0))
    with sklearn.config_context(enable_metadata_routing=True):
        search = _search(inputs["PIL"], y, sample_domain, split,
                         ImageDomainScorer(SupervisedScorer()), target_labels=target_labels)
    scores = search.cv_results_["mean_test_score"]
    assert np.all((scores >= 0) & (scores <= 1))


def test_the_cached_search_runs_each_image_through_the_network_once(small, tmp_path,
                                                                    monkeypatch):
    from skt.extract import FeatureRuntime

    inputs, y, sample_domain = small
    computed = []
    original = FeatureRuntime.summaries

    def counting(self, images, indices, *args, **kwargs):
        for rows, values in original(self, images, indices, *args, **kwargs):
            computed.append(len(rows))
            yield rows, values

    monkeypatch.setattr(FeatureRuntime, "summaries", counting)
    search = _search(inputs["paths"], y, sample_domain,
                     ImageDomainSplit(SourceTargetShuffleSplit(n_splits=3, random_state=0)),
                     ImageDomainScorer(PredictionEntropyScorer()), cache=tmp_path / "cache")
    # 4 candidates x 3 splits and the refit, 20 images: each computed once.
    assert len(search.cv_results_["params"]) == 4 and sum(computed) == 20


def test_scorers_that_need_features_are_refused():
    with pytest.raises(TypeError, match=r"ImageDomainScorer takes scorers that only pass rows "
                                        r"of X to the model \(PredictionEntropyScorer, "
                                        r"SoftNeighborhoodDensity, SupervisedScorer\); "
                                        r"ImportanceWeightedScorer fits models on X itself"):
        ImageDomainScorer(ImportanceWeightedScorer())


def test_a_search_over_adapted_fine_tuning_scored_by_target_entropy(small):
    from skt import FineTuneClassifier

    inputs, y, sample_domain = small
    clf = FineTuneClassifier("resnet18", weights=None, image_size=32, random_state=0,
                             max_iter=1, batch_size=4, domain_adaptation="coral")
    search = GridSearchCV(
        clf, {"adaptation_strength": [0.0, 10.0]},
        cv=ImageDomainSplit(SourceTargetShuffleSplit(n_splits=2, random_state=0)),
        scoring=ImageDomainScorer(PredictionEntropyScorer())).fit(
            inputs["paths"], y, sample_domain=sample_domain)
    scores = search.cv_results_["mean_test_score"]
    # minus the target entropy of two classes: between -log(2) and 0
    assert np.all((scores > -np.log(2) - 1e-9) & (scores < 0)), scores
    assert search.best_estimator_.predict(inputs["paths"][10:]).shape == (10,)
