"""Generated bad inputs through every entry point: a clear error naming the item, or the right rows.

The cases come from :mod:`skt.bench._faults` (hypothesis strategies over
dtypes, shapes, values, PIL modes, file formats, damage, file names and
containers); :func:`skt.bench._faults.classify` sorts each outcome. Every
case must be ``"clean"``: features equal to those of the item alone (and its
neighbours' equal to theirs), or a ``ValueError``/``TypeError`` naming the
item. ``benchmarks/bench_faults.py`` runs a thousand of them and counts.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skt import FeatureExtractor, FineTuneClassifier
from skt.bench._faults import (
    Case,
    array_cases,
    bad_inputs,
    classify,
    classify_skipping,
    command_entry,
    file_cases,
    pil_cases,
    whole_x_cases,
)

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
TINY_OPTIONS = ("--backbone", "resnet18", "--weights", "none", "--random-state", "0",
                "--image-size", "16", "--engine", "torch", "--num-workers", "0")
TINY = dict(backbone="resnet18", weights=None, image_size=16, random_state=0, device="cpu",
            num_workers=0)


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor(**TINY, engine="torch").fit([np.zeros((8, 8, 3), np.uint8)])


@pytest.fixture(scope="module")
def classifier():
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (8, 12, 12, 3), dtype=np.uint8)
    return FineTuneClassifier(**TINY, max_iter=1, batch_size=4, freeze=None).fit(
        X, np.arange(8) % 2)


def check(entry, case: Case, judge=classify, **options) -> None:
    """``judge`` (:func:`classify` or :func:`classify_skipping`) must find ``case`` clean."""
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # on_error="skip" counts its skips
        outcome, detail = judge(entry, case, Path(folder), **options)
    assert outcome == "clean", f"{case.label}: {outcome}: {detail}"


KINDS = {"arrays and tensors": st.one_of(array_cases(), array_cases(tensor=True)),
         "PIL images": pil_cases(), "files": file_cases(), "whole X": whole_x_cases()}


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_each_kind_through_transform(extractor, kind, data):
    check(extractor.transform, data.draw(KINDS[kind], label="case"))


@settings(SETTINGS, max_examples=80)
@given(case=bad_inputs())
def test_everything_through_an_overnight_transform(case):
    """``on_error="skip"``: each item used with its own features, or skipped with a NaN row."""
    extractor = FeatureExtractor(**TINY, engine="torch", on_error="skip").fit(
        [np.zeros((8, 8, 3), np.uint8)])
    check(extractor, case, judge=classify_skipping)


@settings(SETTINGS, max_examples=40)
@given(case=bad_inputs())
def test_everything_through_predict_proba(classifier, case):
    check(classifier.predict_proba, case)


@settings(SETTINGS, max_examples=15)
@given(case=bad_inputs())
def test_everything_through_fine_tuning(case):
    """``fit`` has no row to compare: it trains on the item or names it in its error."""
    def entry(X):
        labels = np.arange(len(X)) % 2 if hasattr(X, "__len__") else None
        return FineTuneClassifier(**TINY, max_iter=1, batch_size=4, freeze=None).fit(X, labels)

    check(entry, case, compare=False)


@settings(SETTINGS, max_examples=25)
@given(case=file_cases().filter(lambda case: case.path))
def test_files_through_skt_extract(case):
    """``skt extract``: status 1 with one line naming the file, or the rows of each file alone."""
    from skt.cli import main

    with tempfile.TemporaryDirectory() as outputs:
        check(command_entry(main, Path(outputs), TINY_OPTIONS), case)
