"""skada's domain-aware splitters and scorers on image inputs.

A ``skada.make_da_pipeline(FeatureExtractor(...), ...)`` fits and predicts
on any images skt takes, with ``sample_domain`` routed by skada. Its
splitters and scorers, however, check ``X`` with scikit-learn's
``check_array``, which accepts a stacked ``(N, H, W, C)`` array but refuses a
list of file paths or PIL images (a 1-D ``X``), although they only count its
rows (splitters) or pass some rows on to the estimator (scorers).
:class:`ImageDomainSplit` and :class:`ImageDomainScorer` let them see row
numbers instead of the images::

    search = GridSearchCV(
        pipe, grid,
        cv=ImageDomainSplit(SourceTargetShuffleSplit(n_splits=5, random_state=0)),
        scoring=ImageDomainScorer(PredictionEntropyScorer()),
    ).fit(paths, y, sample_domain=sample_domain)

Needs the ``da`` extra (``pip install "skt[da]"``); ``import skt`` does not
import this module or skada.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from skada.metrics import PredictionEntropyScorer, SoftNeighborhoodDensity, SupervisedScorer
from skada.model_selection import SplitSampleDomainRequesterMixin
from sklearn.utils import _safe_indexing

from skt._sklearn import _num_samples

__all__ = ["ImageDomainScorer", "ImageDomainSplit"]

# Scorers that only hand rows of X to the estimator's predict_proba, predict or score.
# The others fit models on X itself (density estimates, embeddings, refitted clones):
# on images they need features, not pixels.
_ROW_SCORERS = (PredictionEntropyScorer, SoftNeighborhoodDensity, SupervisedScorer)
_ROW_METHODS = ("predict", "predict_proba", "predict_log_proba", "decision_function", "score",
                "transform")


def _rows(X) -> np.ndarray:
    """Row numbers of ``X`` as the 2-D numeric array skada's checks accept."""
    return np.arange(_num_samples(X)).reshape(-1, 1)


class ImageDomainSplit(SplitSampleDomainRequesterMixin):
    """A skada splitter that splits image inputs by their row numbers.

    Parameters
    ----------
    cv : skada splitter
        ``SourceTargetShuffleSplit``, ``DomainShuffleSplit``,
        ``StratifiedDomainShuffleSplit``, ``LeaveOneDomainOut``, ... It
        receives ``(N, 1)`` row numbers in place of ``X``, with ``y`` and
        ``sample_domain`` as given; the indices it yields are the same.

    Examples
    --------
    >>> import numpy as np
    >>> from skada.model_selection import SourceTargetShuffleSplit
    >>> from skt.da import ImageDomainSplit
    >>> paths = [f"cell{i}.png" for i in range(6)]
    >>> cv = ImageDomainSplit(SourceTargetShuffleSplit(n_splits=1, random_state=0))
    >>> train, test = next(cv.split(paths, sample_domain=np.array([1, 1, 1, -2, -2, -2])))
    >>> len(train) + len(test) == 6
    True
    """

    def __init__(self, cv: Any) -> None:
        self.cv = cv

    def split(self, X, y=None, sample_domain=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(train, test)`` row indices of ``X``, as ``cv`` splits them."""
        yield from self.cv.split(_rows(X), y, sample_domain=sample_domain)

    def get_n_splits(self, X=None, y=None, sample_domain=None) -> int:
        """The number of splits ``cv`` makes."""
        return self.cv.get_n_splits(None if X is None else _rows(X), y,
                                    sample_domain=sample_domain)

    def __repr__(self) -> str:
        return f"ImageDomainSplit({self.cv!r})"


class _RowsOf:
    """An estimator that takes row numbers of ``X`` where it took images."""

    def __init__(self, estimator: Any, X: Any) -> None:
        self._estimator = estimator
        self._X = X

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._estimator, name)
        if name not in _ROW_METHODS:
            return attribute

        def on_rows(rows, *args, **kwargs):
            return attribute(_safe_indexing(self._X, np.asarray(rows)[:, 0]), *args, **kwargs)

        return on_rows


class ImageDomainScorer:
    """A skada scorer that scores a model on image inputs.

    The scorer receives ``(N, 1)`` row numbers in place of ``X`` and an
    estimator that turns the rows it picks back into the images, so that it
    checks and splits ``X`` as it does a feature matrix.

    Parameters
    ----------
    scorer : skada scorer
        One that only passes rows of ``X`` to the estimator:
        ``PredictionEntropyScorer``, ``SoftNeighborhoodDensity`` or
        ``SupervisedScorer``. Scorers that fit models on ``X`` itself
        (``ImportanceWeightedScorer``, ``DeepEmbeddedValidation``,
        ``CircularValidation``, ...) need features, not images: refused with
        a ``TypeError``; use them on ``FeatureExtractor`` output.

    Examples
    --------
    >>> from skada.metrics import PredictionEntropyScorer
    >>> from skt.da import ImageDomainScorer
    >>> ImageDomainScorer(PredictionEntropyScorer())
    ImageDomainScorer(PredictionEntropyScorer())
    """

    def __init__(self, scorer: Any) -> None:
        if not isinstance(scorer, _ROW_SCORERS):
            names = ", ".join(kind.__name__ for kind in _ROW_SCORERS)
            raise TypeError(
                f"ImageDomainScorer takes scorers that only pass rows of X to the model "
                f"({names}); {type(scorer).__name__} fits models on X itself, which for "
                "images needs features: run it on FeatureExtractor(...).transform(X) instead.")
        self.scorer = scorer

    def __call__(self, estimator, X, y_true=None, **params) -> float:
        return self.scorer(_RowsOf(estimator, X), _rows(X), y_true, **params)

    def get_metadata_routing(self):
        """What the wrapped scorer requests (``sample_domain``, ...): passed on to it."""
        return self.scorer.get_metadata_routing()

    def __repr__(self) -> str:
        return f"ImageDomainScorer({type(self.scorer).__name__}())"
