"""FineTuneClassifier with ``sample_domain``: Deep CORAL and DANN adapt the backbone itself.

The shift: 16 px noise images with faint stripes, horizontal for class 0 and
vertical for class 1; the target domain adds a strong random colour offset
to each image. Source-only training learns thresholds the offsets break
(0.65-0.87 target accuracy over seeds 0-5); the adapted fits reach
0.85-1.00 (CORAL) and 0.86-0.97 (DANN). With this random-init network,
whose BatchNorm layers normalise with batch statistics, much of the gain
comes from the source and target batches sharing those statistics (a
strength-0 fit gets most of it); the tests check what the alignment losses
themselves do: CORAL's covariance mismatch shrinks, and DANN's reversal
keeps the domain classifier from telling the domains apart.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sklearn
import torch
from sklearn.base import clone
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils import estimator_checks as checks
from sklearn.utils._param_validation import InvalidParameterError

import skt
from skt.finetune import FineTuneClassifier
from skt.images import Preprocessing
from skt.training import (
    ImageBatches,
    coral_loss,
    cycle_batches,
    dann_coefficient,
    dann_loss,
    make_domain_classifier,
    prediction_entropy,
)

from .conftest import DATA_FREE_CHECKS
from .test_ddp import TOLERANCE, free_port, spawn
from .test_finetune import Crash, CrashAfter, Snapshots, tiny_net, weights_of

SIZE = 16
N = 256  # images per domain in the shift experiment
SEED = 0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stripes(n: int, seed: int, offset: bool = False):
    """Noise with faint stripes (class 0 horizontal, 1 vertical); ``offset``: the target domain."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 100, (n, SIZE, SIZE, 3)).astype(np.float32)
    y = rng.integers(0, 2, n)
    X[y == 0, ::4] += 60
    X[y == 1, :, ::4] += 60
    if offset:
        X += rng.uniform(-80, 120, (n, 1, 1, 3))
    return X.clip(0, 255).astype(np.uint8), y


def domains(n_source: int, n_target: int, seed: int = 1):
    """``(X, y, sample_domain, X_target, y_target)``: ``stripes``, target labels masked."""
    Xs, ys = stripes(n_source, 100 + seed)
    Xt, yt = stripes(n_target, 200 + seed, offset=True)
    return (np.concatenate([Xs, Xt]), np.r_[ys, -np.ones(n_target, int)],
            np.r_[np.ones(n_source, int), -2 * np.ones(n_target, int)], Xt, yt)


def make_clf(**params) -> FineTuneClassifier:
    defaults = dict(backbone=tiny_net(), weights=None, image_size=SIZE, max_iter=2, batch_size=8,
                    learning_rate_init=1e-2, freeze=None, device="cpu", random_state=0)
    return FineTuneClassifier(**{**defaults, **params})


class NoReversal(FineTuneClassifier):
    """DANN's domain classifier trained without the reversal: the features ignore it."""

    def get_adaptation_loss(self, state, source, target):
        return dann_loss(state.domain_classifier, source, target, coefficient=0.0)


@pytest.fixture(scope="module")
def shift():
    X, y, sample_domain, Xt, yt = domains(N, N, SEED)
    return {"Xs": X[:N], "ys": y[:N], "Xt": Xt, "yt": yt, "X": X, "y": y, "d": sample_domain}


FITS = {
    "source": (FineTuneClassifier, {}),
    "coral0": (FineTuneClassifier, dict(domain_adaptation="coral", adaptation_strength=0.0)),
    "coral": (FineTuneClassifier, dict(domain_adaptation="coral", adaptation_strength=10.0)),
    "dann": (FineTuneClassifier, dict(domain_adaptation="dann", adaptation_strength=0.3)),
    "no reversal": (NoReversal, dict(domain_adaptation="dann", adaptation_strength=0.3)),
}


@pytest.fixture(scope="module")
def fits(shift):
    """One fit per configuration, 15 epochs of 8 steps (about 1 s each)."""
    return {name: cls(tiny_net(seed=SEED), weights=None, image_size=SIZE, max_iter=15,
                      batch_size=32, learning_rate_init=1e-2, freeze=None, device="cpu",
                      random_state=SEED, **params).fit(shift["X"], shift["y"],
                                                       sample_domain=shift["d"])
            for name, (cls, params) in FITS.items()}


def target_accuracy(clf, shift) -> float:
    return float(np.mean(clf.predict(shift["Xt"]) == shift["yt"]))


def covariance_mismatch(clf, shift) -> float:
    """Deep CORAL's loss between the fitted network's source and target features."""
    source, target = (torch.as_tensor(clf.transform(shift[k]), dtype=torch.float64)
                      for k in ("Xs", "Xt"))
    return float(coral_loss(source, target))


# ------------------------------------------------------------ the shift experiment


def test_coral_aligns_the_features_and_beats_source_only_on_the_target(fits, shift):
    # Seeds 0-5, target accuracy source-only -> CORAL (strength 10): 0.80 -> 0.99,
    # 0.82 -> 0.96, 0.79 -> 0.99, 0.65 -> 0.85, 0.76 -> 1.00, 0.87 -> 0.88.
    source, coral = fits["source"], fits["coral"]
    assert target_accuracy(coral, shift) >= target_accuracy(source, shift) + 0.1
    assert coral.score(shift["Xs"], shift["ys"]) >= 0.95  # the source task is kept
    losses = [row["adaptation_loss"] for row in coral.history_]
    assert len(losses) == 15 and losses[-1] < losses[0] / 2
    # The loss is what aligns: the covariances match better than with shared BatchNorm
    # statistics alone (strength 0), and far better than without the target images.
    assert covariance_mismatch(coral, shift) < covariance_mismatch(fits["coral0"], shift) / 2
    assert covariance_mismatch(fits["coral0"], shift) < covariance_mismatch(source, shift)
    assert "adaptation_loss" not in source.history_[0]


def test_dann_reversal_keeps_the_domains_hard_to_tell_apart(fits, shift):
    dann, free = fits["dann"], fits["no reversal"]
    chance = 2 * math.log(2)  # skada's DANNLoss sums the two domains' mean BCE
    first = [fit.history_[0]["adaptation_loss"] for fit in (dann, free)]
    assert first == pytest.approx([chance, chance], abs=0.15)
    # Unopposed, the domain classifier learns to tell the offset images apart; through the
    # reversal the features resist it (seeds 0-5: 0.84 against 0.27, 0.96 / 0.48, ...).
    last = [fit.history_[-1]["adaptation_loss"] for fit in (dann, free)]
    assert last[0] > 1.5 * last[1] and last[1] < 0.6
    # Target accuracy, seeds 0-5: 0.80 -> 0.94, 0.82 -> 0.86, 0.79 -> 0.93, 0.65 -> 0.94,
    # 0.76 -> 0.90, 0.87 -> 0.97.
    assert target_accuracy(dann, shift) >= target_accuracy(fits["source"], shift) + 0.1
    assert set(dann.predict(shift["Xt"])) == {0, 1}


def test_the_fitted_network_holds_no_domain_classifier(fits, shift, tmp_path):
    dann, source = fits["dann"], fits["source"]
    assert dann.model_.state_dict().keys() == source.model_.state_dict().keys()
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                   for m in dann.model_.modules())
    proba = dann.predict_proba(shift["Xt"][:16])
    restored = pickle.loads(pickle.dumps(dann))
    np.testing.assert_array_equal(restored.predict_proba(shift["Xt"][:16]), proba)
    skt.save(dann, tmp_path / "dann.skt")
    loaded = skt.load(tmp_path / "dann.skt", modules={"Sequential": tiny_net()})
    np.testing.assert_array_equal(loaded.predict_proba(shift["Xt"][:16]), proba)
    assert loaded.get_params()["domain_adaptation"] == "dann"
    assert loaded.history_ == dann.history_


# --------------------------------------------------- parameters and history


def test_parameters_are_in_get_params_and_survive_clone():
    clf = make_clf(domain_adaptation="dann", adaptation_strength=0.5, scoring="target_entropy")
    params = clf.get_params()
    assert (params["domain_adaptation"], params["adaptation_strength"], params["scoring"]) == (
        "dann", 0.5, "target_entropy")
    assert clone(clf).get_params()["scoring"] == "target_entropy"
    defaults = FineTuneClassifier().get_params()
    assert (defaults["domain_adaptation"], defaults["adaptation_strength"],
            defaults["scoring"]) == (None, 1.0, "accuracy")


@pytest.mark.parametrize("check", DATA_FREE_CHECKS)
def test_data_free_checks_with_domain_adaptation(check):
    estimator = FineTuneClassifier(domain_adaptation="coral", adaptation_strength=3.0,
                                   scoring="loss")
    getattr(checks, check)("FineTuneClassifier", estimator)


def test_history_has_valid_loss_and_target_entropy_and_progress_shows_them(capsys):
    X, y, d, _, _ = domains(24, 16)
    clf = make_clf(domain_adaptation="coral", early_stopping=True, validation_fraction=0.25,
                   scoring="target_entropy", max_iter=3, n_iter_no_change=5, verbose=1)
    clf.fit(X, y, sample_domain=d)
    assert [sorted(row) for row in clf.history_] == [sorted(
        ["epoch", "train_loss", "valid_score", "valid_loss", "adaptation_loss",
         "target_entropy"])] * 3
    assert all(0 < row["target_entropy"] <= math.log(2) and row["valid_loss"] > 0
               and row["valid_score"] * 6 == round(row["valid_score"] * 6)  # 6 held out
               for row in clf.history_)
    assert clf.validation_scores_ == [row["target_entropy"] for row in clf.history_]
    assert clf.best_validation_score_ == min(clf.validation_scores_)
    assert clf.best_iteration_ == 1 + int(np.argmin(clf.validation_scores_))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(re.search(r"adapt_loss \d\.\d{4}, target_entropy 0\.\d{4}", line)
                                   for line in lines)


def test_target_entropy_is_skadas_prediction_entropy_times_the_classes():
    skada = pytest.importorskip("skada")
    X, y, d, _, _ = domains(24, 16)
    clf = make_clf(domain_adaptation="dann", early_stopping=True, validation_fraction=0.25,
                   scoring="target_entropy", max_iter=2, n_iter_no_change=5)
    with sklearn.config_context(enable_metadata_routing=True):  # importing skada sets it too
        pipe = skada.make_da_pipeline(clf).fit(X, y, sample_domain=d)
        score = skada.metrics.PredictionEntropyScorer()(pipe, X, y, sample_domain=d)
    fitted = pipe[-1].base_estimator_
    # skada averages -p log p over images and classes, and negates it (lower is better)
    assert -score * 2 == pytest.approx(fitted.best_validation_score_, rel=1e-5)
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    np.testing.assert_allclose(prediction_entropy(logits), [math.log(2), 0.0], atol=1e-7)


class ScriptedTarget(FineTuneClassifier):
    """Target entropies and validation losses from a script, indexed by the epoch (from 0)."""

    script = (0.5, 0.3, 0.4, 0.45, 0.1)

    def target_entropy(self, state, batches):
        super().target_entropy(state, batches)
        return self.script[state.epoch]

    def validation_score(self, state, batches):
        score = super().validation_score(state, batches)
        state.metrics["valid_loss"] = self.script[state.epoch]
        return score


@pytest.mark.parametrize("scoring", ["target_entropy", "loss"])
def test_early_stopping_on_a_lower_is_better_score_restores_its_best_epoch(scoring):
    X, y, d, _, _ = domains(24, 16)
    clf = ScriptedTarget(**make_clf(
        domain_adaptation="coral", early_stopping=True, validation_fraction=0.25, max_iter=10,
        n_iter_no_change=2, scoring=scoring, callbacks=[Snapshots()]).get_params())
    clf.fit(X, y, sample_domain=d)
    assert clf.n_iter_ == 4 and clf.validation_scores_ == [0.5, 0.3, 0.4, 0.45]
    assert clf.best_validation_score_ == 0.3 and clf.best_iteration_ == 2
    restored = weights_of(clf.model_)
    assert all(torch.equal(restored[k], clf.snapshots_[1][k]) for k in restored)
    assert not torch.equal(restored["0.weight"], clf.snapshots_[3]["0.weight"])


def test_sample_domain_without_domain_adaptation_trains_on_the_source_images_alone():
    X, y, d, _, _ = domains(24, 16)
    params = dict(early_stopping=True, validation_fraction=0.25, augment="flip", max_iter=3)
    source_only = make_clf(**params).fit(X, y, sample_domain=d)
    plain = make_clf(**params).fit(X[:24], y[:24])
    assert all(torch.equal(a, b) for a, b in zip(source_only.model_.state_dict().values(),
                                                 plain.model_.state_dict().values(), strict=True))
    assert source_only.classes_.tolist() == [0, 1]
    # the target images are still scored, for scoring="target_entropy"
    assert "target_entropy" in source_only.history_[0]
    assert "target_entropy" not in plain.history_[0] and "adaptation_loss" not in plain.history_[0]
    # Without sample_domain, -1 is a class like any other.
    assert make_clf(max_iter=1).fit(X[:24], np.where(y[:24] == 0, -1, 1)).classes_.tolist() == [
        -1, 1]


def test_string_classes_with_numeric_masks():
    X, y, d, _, _ = domains(16, 16)
    labels = np.array([["cat", "dog"][label] if label >= 0 else -1 for label in y], dtype=object)
    clf = make_clf(domain_adaptation="coral", max_iter=1).fit(X, labels, sample_domain=d)
    assert clf.classes_.tolist() == ["cat", "dog"]
    assert set(clf.predict(X[16:])) <= {"cat", "dog"}


# ------------------------------------------------------------------ errors

_WHO = ("positive for labelled source images, negative for unlabelled target images, "
        "as in skada")
EIGHT = np.random.default_rng(0).integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
LABELS = np.array([0, 1, 0, 1, -1, -1, -1, -1])
DOMAINS = np.array([1, 1, 1, 1, -2, -2, -2, -2])


@pytest.mark.parametrize(("params", "fit", "message"), [
    (dict(domain_adaptation="coral"), dict(sample_domain=DOMAINS[:7]),
     f"X has 8 images but sample_domain has 7 entries; pass one domain per image ({_WHO})."),
    (dict(domain_adaptation="coral"), dict(sample_domain=DOMAINS.reshape(4, 2)),
     "sample_domain must be one domain per image, a list or a 1-D array; got an array of "
     "shape (4, 2)."),
    (dict(domain_adaptation="coral"), dict(sample_domain=np.where(np.arange(8) == 2, 0, DOMAINS)),
     f"sample_domain must hold non-zero integers ({_WHO}), but sample_domain[2] = 0."),
    (dict(domain_adaptation="coral"), dict(sample_domain=[1, 1.5, 1, 1, -2, -2, -2, -2]),
     f"sample_domain must hold non-zero integers ({_WHO}), but sample_domain[1] = 1.5."),
    (dict(), dict(sample_domain=["s", "s", "s", "s", "t", "t", "t", "t"]),
     f"sample_domain must hold non-zero integers ({_WHO}), but sample_domain[0] = 's'."),
    (dict(domain_adaptation="coral"), dict(sample_domain=-np.abs(DOMAINS)),
     "sample_domain marks no source image (none is positive); the classifier learns from "
     "labelled source images. Give them a positive domain, e.g. 1, and the unlabelled target "
     "images a negative one, e.g. -2."),
    (dict(domain_adaptation="dann"), dict(y=np.array([0, 1] * 4), sample_domain=np.abs(DOMAINS)),
     "sample_domain marks no target image (none is negative), which domain_adaptation='dann' "
     "needs. Give the unlabelled target images a negative domain, e.g. -2 (with y = -1), or "
     "fit without it."),
    (dict(early_stopping=True, scoring="target_entropy"),
     dict(y=np.array([0, 1] * 4), sample_domain=np.abs(DOMAINS)),
     "sample_domain marks no target image (none is negative), which "
     "scoring='target_entropy' needs."),
    (dict(domain_adaptation="coral"), dict(y=np.array([0, 1] * 4), sample_domain=DOMAINS),
     "y labels 4 target image(s) (sample_domain < 0), e.g. y[4] = 0; domain adaptation learns "
     "without target labels. Mask them with -1, as skada does: y[sample_domain < 0] = -1."),
    (dict(), dict(y=np.where(np.arange(8) == 1, -1, LABELS), sample_domain=DOMAINS),
     "y[1] = -1 for a source image (sample_domain[1] > 0), but -1 marks an unlabelled target "
     "image (skada's mask). Label every source image, or give the unlabelled ones a negative "
     "sample_domain."),
    (dict(domain_adaptation="dann"), dict(),
     f"domain_adaptation='dann' aligns source and target images, but fit got no "
     f"sample_domain. Pass sample_domain ({_WHO}), or domain_adaptation=None."),
    (dict(early_stopping=True, scoring="target_entropy"), dict(y=np.array([0, 1] * 4)),
     f"scoring='target_entropy' scores predictions on target images, but fit got no "
     f"sample_domain. Pass sample_domain ({_WHO}), or another scoring."),
    (dict(domain_adaptation="coral"), dict(sample_domain=np.where(np.arange(8) < 7, 1, -2),
                                           y=np.r_[[0, 1] * 3, 0, -1]),
     "sample_domain marks 1 target image, too few for a target batch: domain adaptation needs "
     "at least 2, for the statistics of the alignment loss. Add target images."),
])
def test_domain_errors_name_what_is_wrong_and_what_to_do(params, fit, message):
    fit = {"y": LABELS, **fit}
    with pytest.raises(ValueError) as info:
        make_clf(**params).fit(EIGHT, **fit)
    assert str(info.value).startswith(message)


def test_invalid_domain_parameters_are_refused():
    with pytest.raises(InvalidParameterError, match="'domain_adaptation' parameter"):
        make_clf(domain_adaptation="mmd").fit(EIGHT, LABELS, sample_domain=DOMAINS)
    with pytest.raises(InvalidParameterError, match="'adaptation_strength' parameter"):
        make_clf(adaptation_strength=-1.0).fit(EIGHT, LABELS, sample_domain=DOMAINS)
    with pytest.raises(InvalidParameterError, match="'scoring' parameter"):
        make_clf(scoring="f1").fit(EIGHT, LABELS)


def test_a_missing_skada_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "skada" or m.startswith("skada.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "skada", None)  # import skada raises ImportError
    with pytest.raises(ImportError, match=re.escape('pip install "skt[da]"')):
        make_clf(domain_adaptation="coral").fit(EIGHT, LABELS, sample_domain=DOMAINS)
    fitted = make_clf(max_iter=1).fit(EIGHT, LABELS, sample_domain=DOMAINS)  # source only
    assert fitted.classes_.tolist() == [0, 1]


def test_only_fits_that_adapt_import_skada():
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from torch import nn
        import skt
        before = "skada" in sys.modules
        X = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, 2))
        clf = skt.FineTuneClassifier(net, weights=None, image_size=16, max_iter=1,
                                     batch_size=4, freeze=None, device="cpu")
        clf.fit(X, [0, 1] * 4)
        clf.fit(X, [0, 1, 0, 1, -1, -1, -1, -1], sample_domain=[1] * 4 + [-2] * 4)
        print(before, "skada" in sys.modules, "skorch" in sys.modules)
        # A fit that adapts imports skada, whose import turns metadata routing on: as it
        # would be had the user imported skada, not undone when the fit ends.
        clf.set_params(domain_adaptation="coral").fit(X, [0, 1, 0, 1, -1, -1, -1, -1],
                                                      sample_domain=[1] * 4 + [-2] * 4)
        import sklearn
        print("skada" in sys.modules, sklearn.get_config()["enable_metadata_routing"])
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["False", "False", "False", "True", "True"]


# ------------------------------------------------------ loop pieces and paths


def test_cycle_batches_starts_a_new_pass_with_a_new_order():
    assert list(zip(range(5), cycle_batches(["a", "b"]), strict=False)) == [
        (0, "a"), (1, "b"), (2, "a"), (3, "b"), (4, "a")]
    X, y, _, _, _ = domains(6, 0)
    config = Preprocessing(crop_size=SIZE, resize_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3)
    batches = ImageBatches(X, y, range(6), config, 6, shuffle=True,
                           generator=torch.Generator().manual_seed(0))
    passes = cycle_batches(batches)
    first, second = next(passes)[0], next(passes)[0]
    passes.close()
    assert not torch.equal(first, second)  # the same images, drawn in another order
    assert sorted(first.sum((1, 2, 3)).tolist()) == pytest.approx(
        sorted(second.sum((1, 2, 3)).tolist()))


def test_dann_coefficient_ramps_from_zero_to_one_and_the_classifier_is_seeded():
    values = [dann_coefficient(p) for p in np.linspace(0, 1, 11)]
    assert values[0] == 0 and values[-1] == pytest.approx(1, abs=1e-4)
    assert all(np.diff(values) > 0)
    first, second = make_domain_classifier(16, seed=3), make_domain_classifier(16, seed=3)
    assert [m.__class__.__name__ for m in first] == ["Linear", "ReLU", "Linear"]
    assert first[-1].out_features == 1
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(),
                                                 strict=True))


class Trunks(Snapshots):
    def on_epoch_end(self, estimator, state):
        super().on_epoch_end(estimator, state)
        state.history[-1]["trunk"] = None if state.trunk is None else state.trunk.n_frozen


def test_target_batches_go_through_the_frozen_trunk_with_the_same_result():
    X, y, d, _, _ = domains(32, 24)
    params = dict(domain_adaptation="dann", freeze=2, max_iter=2, callbacks=[Trunks()],
                  early_stopping=True, validation_fraction=0.25, scoring="target_entropy")
    trunk = make_clf(frozen_cache="memory", **params).fit(X, y, sample_domain=d)
    plain = make_clf(frozen_cache=None, **params).fit(X, y, sample_domain=d)
    assert [row["trunk"] for row in trunk.history_] == [2, 2]
    assert [row["trunk"] for row in plain.history_] == [None, None]
    for name, value in weights_of(plain.model_).items():
        torch.testing.assert_close(trunk.model_.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    for key in ("train_loss", "adaptation_loss", "target_entropy"):
        assert [row[key] for row in trunk.history_] == pytest.approx(
            [row[key] for row in plain.history_], rel=1e-4)


def test_a_resumed_adaptation_ends_like_an_uninterrupted_one(tmp_path):
    X, y, d, _, _ = domains(24, 20)
    params = make_clf(domain_adaptation="dann", augment="flip", max_iter=3, early_stopping=True,
                      validation_fraction=0.25, random_state=5).get_params()
    uninterrupted = FineTuneClassifier(**params).fit(X, y, sample_domain=d)
    path = tmp_path / "run.ckpt"
    with pytest.raises(Crash):
        CrashAfter(**params).set_params(checkpoint=path).fit(X, y, sample_domain=d)
    resumed = FineTuneClassifier(**params).set_params(checkpoint=path).fit(X, y, sample_domain=d)
    assert resumed.history_ == uninterrupted.history_
    assert all(torch.equal(a, b) for a, b in zip(resumed.model_.state_dict().values(),
                                                 uninterrupted.model_.state_dict().values(),
                                                 strict=True))
    # Other domains make another fit: the checkpoint is replaced.
    with pytest.warns(UserWarning, match="other parameters, images, labels or domains"):
        FineTuneClassifier(**params).set_params(checkpoint=path).fit(
            X, y, sample_domain=np.where(d > 0, 1, -3))


# ------------------------------------------------------------ metadata routing


def test_sample_domain_is_requested_and_routed_through_pipelines():
    X, y, d, Xt, _ = domains(16, 16)
    with sklearn.config_context(enable_metadata_routing=True):
        clf = make_clf(domain_adaptation="coral", max_iter=1)
        assert clf.set_fit_request(sample_domain=True) is clf
        pipe = make_pipeline(FunctionTransformer(), make_clf(domain_adaptation="coral",
                                                             max_iter=1))
        pipe.fit(X, y, sample_domain=d)  # requested by default: no set_fit_request needed
        assert "adaptation_loss" in pipe[-1].history_[0]
        assert pipe.predict(Xt).shape == (16,)
    assert FineTuneClassifier().get_metadata_routing().fit.requests == {"sample_domain": True}


def test_skadas_da_pipeline_passes_sample_domain_and_masks_target_labels():
    skada = pytest.importorskip("skada")
    X, y, d, Xt, yt = domains(16, 16)
    labelled = np.r_[y[:16], yt]  # skada's selector masks the target labels itself
    with sklearn.config_context(enable_metadata_routing=True):
        pipe = skada.make_da_pipeline(make_clf(domain_adaptation="dann", max_iter=1))
        pipe.fit(X, labelled, sample_domain=d)
        fitted = pipe[-1].base_estimator_
        predicted = pipe.predict(Xt, sample_domain=-2 * np.ones(16, int))
    assert fitted.classes_.tolist() == [0, 1] and "adaptation_loss" in fitted.history_[0]
    np.testing.assert_array_equal(predicted, fitted.predict(Xt))


# ------------------------------------------------------------ across processes

DDP_FITS = {
    # equal pieces of 4 source and 4 target images: DANN's per-piece mean losses average to
    # the whole batch's, so two processes train the weights of one
    "dann": dict(domain_adaptation="dann", early_stopping=True, validation_fraction=0.2,
                 scoring="target_entropy", n_iter_no_change=5),
    # CORAL's covariances are those of each process's pieces: other weights, the same on both
    "coral": dict(domain_adaptation="coral", adaptation_strength=10.0, freeze=2,
                  frozen_cache="memory"),
}


def fit_domains(name: str) -> FineTuneClassifier:
    X, y, d, _, _ = domains(40, 40)
    params = {"freeze": None, "batchnorm": "fixed", **DDP_FITS[name]}
    return make_clf(**params).fit(X, y, sample_domain=d)


def adapt_on_rank(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    seen = {}
    for name in DDP_FITS:
        clf = fit_domains(name)
        seen[name] = {"weights": clf.model_.state_dict(), "history": clf.history_,
                      "world": clf.world_size_}
    torch.save(seen, os.path.join(folder, f"rank{rank}.pt"))


def test_two_processes_adapt_together(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spawn(adapt_on_rank, (2, free_port(), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in DDP_FITS:
        first, second = (seen[name] for seen in ranks)
        assert first["world"] == 2 and first["history"] == second["history"]
        assert all(torch.equal(first["weights"][k], second["weights"][k])
                   for k in first["weights"])
    alone = fit_domains("dann")
    for name, value in alone.model_.state_dict().items():
        torch.testing.assert_close(ranks[0]["dann"]["weights"][name], value, **TOLERANCE)
    assert [row["target_entropy"] for row in ranks[0]["dann"]["history"]] == pytest.approx(
        [row["target_entropy"] for row in alone.history_], rel=1e-5)
