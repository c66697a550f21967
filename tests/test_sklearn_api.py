"""scikit-learn contract of FeatureExtractor (image input: the data-free checks by name)."""

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

from skt import FeatureExtractor

from .conftest import DATA_FREE_CHECKS, TINY


@pytest.mark.parametrize("check", DATA_FREE_CHECKS)
def test_data_free_estimator_checks(check):
    estimator = FeatureExtractor(**TINY)
    getattr(checks, check)(type(estimator).__name__, estimator)


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
    pd = pytest.importorskip("pandas")
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
