"""scikit-learn contract of both estimators (image input: the data-free checks by name)."""

import inspect
import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils import estimator_checks as checks

from skt import FeatureExtractor, FineTuneClassifier
from skt.training import EarlyStopping

from .conftest import DATA_FREE_CHECKS, TINY, require
from .test_finetune import make_clf, make_images

ESTIMATORS = [FeatureExtractor(**TINY), FineTuneClassifier(),
              FineTuneClassifier(callbacks=[EarlyStopping(patience=2)])]


@pytest.mark.parametrize("check", DATA_FREE_CHECKS)
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_data_free_estimator_checks(check, estimator):
    getattr(checks, check)(type(estimator).__name__, estimator)


@pytest.mark.parametrize("cls", [FeatureExtractor, FineTuneClassifier])
def test_parameters_after_the_first_two_are_keyword_only(cls):
    parameters = list(inspect.signature(cls).parameters.values())
    assert [p.name for p in parameters[:2]] == ["backbone", "weights"]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in parameters[:2])
    assert all(p.kind is p.KEYWORD_ONLY for p in parameters[2:])
    with pytest.raises(TypeError, match="positional argument"):
        cls("resnet18", None, 64)


@pytest.mark.parametrize("cls", [FeatureExtractor, FineTuneClassifier])
def test_each_class_declares_its_runtime_state(cls):
    assert cls._runtime_attributes == ("_runtime",)


def test_init_only_stores_parameters():
    extractor = FeatureExtractor(backbone="no_such_net", weights="nonsense", device="tpu")
    assert extractor.get_params()["backbone"] == "no_such_net"  # nothing resolved yet
    with pytest.raises(ValueError, match="device='tpu' is not a torch device"):
        extractor.fit(np.zeros((1, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="Unknown backbone 'no_such_net'"):
        extractor.set_params(device="cpu").fit(np.zeros((1, 8, 8), np.uint8))


def test_parameters_are_validated_at_fit(images):
    with pytest.raises(ValueError, match="'pooling' parameter.*must be a str among"):
        FeatureExtractor(**TINY, pooling="median").fit(images)
    with pytest.raises(ValueError, match="'batch_size' parameter.*range \\[1, inf\\)"):
        FeatureExtractor(**TINY, batch_size=0).fit(images)


def test_not_fitted_then_fitted(images):
    extractor = FeatureExtractor(**TINY)
    with pytest.raises(NotFittedError):
        extractor.transform(images)
    assert extractor.fit(images) is extractor
    assert not hasattr(clone(extractor), "n_features_out_")


def test_tags_say_images_not_tables():
    tags = FeatureExtractor().__sklearn_tags__()
    assert tags.input_tags.two_d_array is False and tags.input_tags.three_d_array is True


def test_set_output_pandas(images):
    pd = require("pandas", "pip install pandas")
    extractor = FeatureExtractor(**TINY, layers="layer3").set_output(transform="pandas")
    frame = extractor.fit_transform(images)
    assert isinstance(frame, pd.DataFrame) and frame.shape == (8, 256)
    assert frame.columns[0] == "layer3_avg_0" and frame.columns[-1] == "layer3_avg_255"


@pytest.fixture
def two_classes(image_folder):
    from skt import load_image_folder

    return load_image_folder(image_folder)


@pytest.mark.parametrize("head", [SVC(), LogisticRegression(), LinearDiscriminantAnalysis()])
def test_pipeline_heads_learn_brightness(two_classes, head):
    paths, labels = two_classes
    pipe = make_pipeline(FeatureExtractor(**TINY), StandardScaler(), head)
    pipe.fit(paths[::2], labels[::2])
    assert pipe.score(paths[1::2], labels[1::2]) == 1.0  # bright vs dark is easy
    assert set(pipe.predict(paths)) == {"bright", "dark"}


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_grid_search_over_extractor_and_head(two_classes, n_jobs):
    paths, labels = two_classes
    pipe = make_pipeline(FeatureExtractor(**TINY), LogisticRegression())
    grid = {"featureextractor__layers": [None, "layer2"],
            "logisticregression__C": [0.1, 10.0]}
    search = GridSearchCV(pipe, grid, cv=2, n_jobs=n_jobs).fit(paths, labels)
    assert len(search.cv_results_["params"]) == 4
    assert search.best_score_ == 1.0
    assert search.best_estimator_.predict(paths).tolist() == labels.tolist()


# ------------------------------------------------------------ FineTuneClassifier --

@pytest.fixture(scope="module")
def finetune_data():
    return make_images()


def test_fine_tune_not_fitted_fit_returns_self_clone_and_pickle(finetune_data):
    X, y = finetune_data
    fresh = make_clf()
    for method in ("predict", "predict_proba", "decision_function", "transform"):
        with pytest.raises(NotFittedError):
            getattr(fresh, method)(X)
    with pytest.raises(NotFittedError):
        fresh.get_feature_names_out()
    fitted = fresh.fit(X, y)
    assert fitted is fresh
    assert not hasattr(clone(fitted), "model_")
    proba, features = fitted.predict_proba(X), fitted.transform(X)
    state = fitted.__getstate__()
    assert state["_runtime"] is None and fitted._runtime is not None
    restored = pickle.loads(pickle.dumps(fitted))
    assert np.array_equal(restored.predict_proba(X), proba)
    assert np.array_equal(restored.transform(X), features)
    assert np.array_equal(fitted.predict_proba(X), proba)  # pickling left the original as it was
    assert fitted.__sklearn_tags__().estimator_type == "classifier"
    names = fitted.get_feature_names_out(input_features=["ignored"])
    assert names.tolist() == [f"pre_logits_{i}" for i in range(features.shape[1])]


def test_fine_tune_grid_search_over_learning_rate_and_freeze(finetune_data):
    X, y = finetune_data
    search = GridSearchCV(
        make_clf(max_iter=2),
        {"learning_rate_init": [1e-30, 3e-2], "freeze": [None, "all"]}, cv=2,
    ).fit(X, y)
    assert len(search.cv_results_["mean_test_score"]) == 4
    assert search.best_params_["learning_rate_init"] == 3e-2
    assert search.best_estimator_.learning_rate_init == 3e-2
    assert search.score(X, y) >= 0.9


def test_fine_tuned_features_feed_a_pipeline(finetune_data):
    X, y = finetune_data
    pipe = make_pipeline(make_clf(max_iter=2), StandardScaler(), LogisticRegression())
    assert pipe.fit(X, y).score(X, y) >= 0.9
    assert pipe[:-1].get_feature_names_out()[0] == "pre_logits_0"

