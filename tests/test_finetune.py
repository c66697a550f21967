"""FineTuneClassifier: tiny images, a tiny BatchNorm network, a few epochs per fit.

The training pieces on their own (freeze plans, schedules, regularisers,
batches, checkpoint files, callbacks) are tested in test_training.py, which
shares the helpers below; the scikit-learn contract is in test_sklearn_api.py.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tempfile
import textwrap

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.svm import SVC
from sklearn.utils._param_validation import InvalidParameterError
from torch import nn

from skt.extractor import FeatureExtractor
from skt.finetune import FineTuneClassifier
from skt.images import iter_batches
from skt.training import Callback

SIZE = 16


def tiny_net(outputs: int = 5, momentum: float | None = 0.1, seed: int = 0) -> nn.Sequential:
    """Two conv + BatchNorm blocks and a linear classifier "8": stages "0", "1", "3", "4"."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16, momentum=momentum),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, outputs),
    )


def make_images(n: int = 32, classes=("a", "b"), seed: int = 0):
    """Noise images; class k has a bright vertical band in the k-th slice of the width."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 100, (n, SIZE, SIZE, 3), dtype=np.uint8)
    y = np.array([classes[i % len(classes)] for i in range(n)])
    band = SIZE // len(classes)
    for k, label in enumerate(classes):
        X[y == label, :, k * band:(k + 1) * band] += 150
    return X, y


def make_clf(**params) -> FineTuneClassifier:
    defaults = dict(backbone=tiny_net(), weights=None, image_size=SIZE, max_iter=2,
                    batch_size=8, learning_rate_init=1e-2, freeze=None, device="cpu",
                    random_state=0)
    defaults.update(params)
    return FineTuneClassifier(**defaults)


def weights_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unchanged(before: dict, after: dict, prefix: str) -> bool:
    keys = [k for k in before if k == prefix or k.startswith(prefix + ".")]
    assert keys, prefix
    return all(torch.equal(before[k], after[k]) for k in keys)


class Snapshots(Callback):
    """Keeps in the estimator's ``snapshots_`` a copy of the weights after each epoch."""

    def on_train_begin(self, estimator, state):
        estimator.snapshots_ = []

    def on_epoch_end(self, estimator, state):
        estimator.snapshots_.append(weights_of(state.model))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return make_images()


@pytest.fixture(scope="module")
def fitted(data):
    X, y = data
    return make_clf(max_iter=3).fit(X, y)


# ------------------------------------------------------------ classifier face


def test_learns_string_labels_and_predicts_them(fitted, data):
    X, y = data
    assert fitted.classes_.tolist() == ["a", "b"]
    assert set(fitted.predict(X)) <= {"a", "b"}
    assert fitted.score(X, y) >= 0.9
    assert fitted.n_iter_ == 3 and len(fitted.loss_curve_) == 3
    assert fitted.loss_curve_[-1] < fitted.loss_curve_[0]
    assert fitted.validation_scores_ is None and fitted.best_iteration_ is None


def test_probabilities_decision_function_and_predict_agree(fitted, data):
    X, _ = data
    proba = fitted.predict_proba(X)
    assert proba.shape == (len(X), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    decision = fitted.decision_function(X)
    assert decision.shape == (len(X),)  # binary: logit of classes_[1] minus classes_[0]
    np.testing.assert_allclose(decision, np.log(proba[:, 1] / proba[:, 0]), rtol=1e-4, atol=1e-5)
    assert np.array_equal(fitted.predict(X), fitted.classes_[(decision > 0).astype(int)])
    np.testing.assert_allclose(fitted.predict_log_proba(X), np.log(proba))


def test_multiclass_integer_labels():
    X, y = make_images(36, classes=(30, 10, 20))
    clf = make_clf(max_iter=3).fit(X, y)
    assert clf.classes_.tolist() == [10, 20, 30]
    decision = clf.decision_function(X)
    assert decision.shape == (36, 3)
    # The network's own logits, computed outside the prediction runtime.
    with torch.no_grad():
        logits = torch.cat([clf.model_(batch)
                            for batch in iter_batches(X, clf.preprocessing_, 8, 0)])
    np.testing.assert_allclose(decision, logits.numpy(), rtol=1e-4, atol=1e-5)
    assert np.array_equal(clf.predict(X), clf.classes_[decision.argmax(axis=1)])
    assert clf.predict_proba(X).argmax(axis=1).tolist() == decision.argmax(axis=1).tolist()
    head = clf.model_[8]
    assert isinstance(head, nn.Linear) and head.out_features == 3 and head.in_features == 16


def test_model_is_on_cpu_in_eval_mode_and_keeps_batchnorm_momentum(fitted):
    model = fitted.model_
    assert not model.training
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == [0.1, 0.1]
    assert all(p.requires_grad for p in model.parameters())


def test_transform_gives_penultimate_features_for_other_heads(fitted, data):
    X, y = data
    features = fitted.transform(X)
    assert features.shape == (len(X), 16) and features.dtype == np.float32
    recorded = []
    model = copy.deepcopy(fitted.model_)
    model[8].register_forward_pre_hook(lambda module, args: recorded.append(args[0]))
    with torch.no_grad():
        for batch in iter_batches(X, fitted.preprocessing_, 8, 0):
            model(batch)
    np.testing.assert_allclose(features, torch.cat(recorded).numpy(), rtol=1e-4, atol=1e-5)
    assert fitted.get_feature_names_out()[:2].tolist() == ["pre_logits_0", "pre_logits_1"]
    for head in (SVC(), LinearDiscriminantAnalysis()):
        pipeline = make_pipeline(clone(fitted), head).fit(X, y)
        assert pipeline.score(X, y) >= 0.9


def test_weights_file_and_preprocessing_parameters_as_for_feature_extractor(data, tmp_path):
    X, y = data
    trained = tiny_net(seed=1)
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    clf = make_clf(weights=str(tmp_path / "weights.pt"), freeze="all", mean=0.5, std=0.25,
                   image_size=20, crop_mode="squash").fit(X, y)
    assert clf.weights_ == f"path:{tmp_path / 'weights.pt'}"
    assert clf.preprocessing_.crop_size == 20
    assert clf.preprocessing_.mean == (0.5,) * 3 and clf.preprocessing_.std == (0.25,) * 3
    assert (clf.preprocessing_.crop_mode, clf.preprocessing_.resize_size) == ("squash", 20)
    expected = weights_of(trained)
    assert all(unchanged(expected, weights_of(clf.model_), name)
               for name in ("0", "1", "3", "4"))


# ------------------------------------------------------------------ freezing


@pytest.mark.parametrize(("freeze", "frozen"), [(1, {"0"}), (2, {"0", "1"})])
def test_freeze_stage_count_keeps_weights_and_batchnorm_statistics(data, freeze, frozen):
    X, y = data
    net = tiny_net()
    before = weights_of(net)
    after = weights_of(make_clf(backbone=net, freeze=freeze).fit(X, y).model_)
    # A frozen BatchNorm stage keeps its running statistics too; one that
    # trains ("1" with freeze=1) ends with new ones.
    for name in ("0", "1", "3", "4"):
        assert unchanged(before, after, name) == (name in frozen), name


def test_freeze_all_trains_only_the_head(data):
    X, y = data
    net = tiny_net()
    before = weights_of(net)
    clf = make_clf(backbone=net, freeze="all", max_iter=3, learning_rate_init=0.1).fit(X, y)
    after = weights_of(clf.model_)
    assert all(unchanged(before, after, name) for name in ("0", "1", "3", "4"))
    assert clf.model_[8].out_features == 2
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]


def test_freeze_patterns_match_names_and_modules(data):
    X, y = data
    net = tiny_net()
    before = weights_of(net)
    after = weights_of(make_clf(backbone=net, freeze=["3", "*.bias"]).fit(X, y).model_)
    assert unchanged(before, after, "3")
    assert torch.equal(before["0.bias"], after["0.bias"])
    assert not torch.equal(before["0.weight"], after["0.weight"])


def test_unfreeze_schedule_thaws_the_stage_nearest_the_head(data):
    X, y = data
    net = tiny_net()
    before = weights_of(net)
    clf = make_clf(backbone=net, freeze="all", unfreeze_schedule=1, max_iter=3,
                   callbacks=[Snapshots()]).fit(X, y)
    # Four stages frozen in epoch 1, three in epoch 2 ("4" thaws), two in epoch 3 ("3" thaws).
    trained = [[name for name in ("0", "1", "3", "4") if not unchanged(before, after, name)]
               for after in clf.snapshots_]
    assert trained == [[], ["4"], ["3", "4"]]
    assert unchanged(clf.snapshots_[-1], weights_of(clf.model_), "3")


@pytest.mark.parametrize(("params", "message"), [
    ({"freeze": 5}, r"freeze=5, but this backbone has 4 stages: \['0', '1', '3', '4'\]"),
    ({"freeze": "7"}, r"freeze pattern '7' matches no backbone parameter"),
    ({"freeze": ["0"], "unfreeze_schedule": 1}, "freeze must be a stage count or 'all'"),
    ({"unfreeze_schedule": 1}, "unfreeze_schedule=1 has nothing to unfreeze"),
])
def test_freeze_errors(data, params, message):
    X, y = data
    with pytest.raises(ValueError, match=message):
        make_clf(**params).fit(X, y)


def test_unknown_freeze_name_lists_close_matches(data):
    X, y = data
    clf = FineTuneClassifier("resnet18", weights=None, image_size=32, freeze="layer5")
    with pytest.raises(ValueError, match=r"Close matches: \['layer4', 'layer3'"):
        clf.fit(X, y)


# ------------------------------------------------------------------ BatchNorm


class NaiveBatchNorm(FineTuneClassifier):
    """The plain loop: train mode, the network's own exponential running averages."""

    def begin_epoch(self, state):
        state.model.train()


def batchnorm_input_mean(model: nn.Module, X, config) -> torch.Tensor:
    seen = []
    handle = model[1].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        for batch in iter_batches(X, config, 16, 0):
            model(batch)
    handle.remove()
    return torch.cat(seen).mean(dim=(0, 2, 3))


def test_batchnorm_statistics_match_the_fine_tuned_weights():
    # TensorFlow-style momentum 0.01 and activations far from the initial
    # statistics (mean 0): a few steps of exponential averaging leave them stale.
    X, y = make_images(48)
    net = tiny_net(momentum=0.01)
    with torch.no_grad():
        net[0].bias.fill_(3.0)
    ours = make_clf(backbone=net).fit(X, y)
    naive = NaiveBatchNorm(**ours.get_params()).fit(X, y)
    assert naive.loss_curve_ == ours.loss_curve_  # same training, different statistics
    for clf, low, high in ((ours, 0.0, 0.1), (naive, 1.0, np.inf)):
        actual = batchnorm_input_mean(clf.model_, X, clf.preprocessing_)
        error = (clf.model_[1].running_mean - actual).abs().max().item()
        assert low <= error < high, (type(clf).__name__, error)
    assert ours.score(X, y) >= 0.9
    assert naive.score(X, y) <= 0.75
    assert ours.model_[1].momentum == 0.01


def test_pretrained_batchnorm_statistics_stay_fixed_while_the_layer_trains(data):
    X, y = data
    net = tiny_net()
    with torch.no_grad():  # the first norm layer has statistics, the second is as initialised
        net[1].running_mean.fill_(0.5)
        net[1].running_var.fill_(2.0)
    before = weights_of(net)
    auto = weights_of(make_clf(backbone=net).fit(X, y).model_)
    assert all(torch.equal(auto[k], before[k]) for k in ("1.running_mean", "1.running_var"))
    assert not torch.equal(auto["1.weight"], before["1.weight"])
    assert not torch.equal(auto["4.running_mean"], before["4.running_mean"])
    batch = weights_of(make_clf(backbone=net, batchnorm="batch").fit(X, y).model_)
    assert not torch.equal(batch["1.running_mean"], before["1.running_mean"])
    fixed = weights_of(make_clf(backbone=net, batchnorm="fixed").fit(X, y).model_)
    assert torch.equal(fixed["4.running_var"], before["4.running_var"])
    assert not torch.equal(fixed["4.weight"], before["4.weight"])


# ------------------------------------------------------------- regularisers


def distance_to(net: nn.Module, model: nn.Module) -> float:
    reference = dict(net.named_parameters())
    return sum((p.detach() - reference[name].detach()).pow(2).sum().item()
               for name, p in model.named_parameters() if not name.startswith("8."))


def test_l2sp_stays_closer_to_the_pretrained_weights_than_none(data):
    X, y = data
    net = tiny_net()
    plain = make_clf(backbone=net, backbone_lr_scale=1.0, max_iter=3).fit(X, y)
    l2sp = make_clf(backbone=net, backbone_lr_scale=1.0, max_iter=3, regularization="l2sp",
                    alpha=5.0).fit(X, y)
    assert distance_to(net, l2sp.model_) < 0.7 * distance_to(net, plain.model_)


def test_lwf_with_alpha_one_only_distils(data):
    X, y = data
    net = tiny_net()
    pure = make_clf(backbone=net, regularization="lwf", alpha=1.0, weight_decay=0.0)
    start = make_clf(backbone=net, max_iter=1, learning_rate_init=1e-30).fit(X, y)
    pure.fit(X, y)
    # The new head gets no gradient from the target loss; the backbone still moves.
    assert torch.equal(pure.model_[8].weight, start.model_[8].weight)
    assert not torch.equal(pure.model_[0].weight, net[0].weight)
    with pytest.raises(ValueError, match="alpha must be in"):
        make_clf(regularization="lwf", alpha=1.5).fit(X, y)


def test_class_weight_changes_the_loss(data):
    X, y = data
    unbalanced = np.r_[np.flatnonzero(y == "a"), np.flatnonzero(y == "b")[:4]]
    X, y = X[unbalanced], y[unbalanced]
    curves = [make_clf(class_weight=w, max_iter=1).fit(X, y).loss_curve_[0]
              for w in (None, "balanced", {"a": 1.0, "b": 1.0})]
    assert curves[0] != curves[1]
    assert curves[0] == curves[2]


# ------------------------------------------------------ schedule and optimiser


class Recorder(FineTuneClassifier):
    """Records the learning rate of each parameter group at each step."""

    def train_step(self, state, images, y):
        self.record_.append([group["lr"] for group in state.optimizer.param_groups])
        self.optimizer_type_ = type(state.optimizer).__name__
        self.decay_ = [group["weight_decay"] for group in state.optimizer.param_groups]
        return super().train_step(state, images, y)

    def fit(self, X, y):
        self.record_ = []
        return super().fit(X, y)


@pytest.mark.parametrize("schedule", ["cosine", "constant", "onecycle"])
def test_learning_rate_schedules(data, schedule):
    X, y = data
    clf = Recorder(**make_clf(lr_schedule=schedule, max_iter=4, warmup=0.25,
                              learning_rate_init=0.1, backbone_lr_scale=0.1).get_params())
    lrs = np.array(clf.fit(X, y).record_)  # 16 steps; groups: head (2), backbone (2)
    head, backbone = lrs[:, 0], lrs[:, 2]
    np.testing.assert_allclose(backbone, 0.1 * head)
    peak = int(np.argmax(head))
    assert 3 <= peak <= 4  # warm-up: a quarter of 16 steps
    assert np.all(np.diff(head[:peak + 1]) > 0)
    assert head.max() == pytest.approx(0.1)
    if schedule == "constant":
        np.testing.assert_allclose(head[peak:], 0.1)
    else:
        assert np.all(np.diff(head[peak:]) < 0) and head[-1] < 0.01
    assert clf.optimizer_type_ == "AdamW"


def test_onecycle_schedule_on_a_short_fit(data):
    X, y = data
    # One epoch of 4 steps with the default warmup=0.1: less than one step of warm-up.
    clf = Recorder(**make_clf(lr_schedule="onecycle", max_iter=1).get_params()).fit(X, y)
    head = np.array(clf.record_)[:, 0]
    assert len(head) == 4
    assert head.max() == pytest.approx(0.01)  # learning_rate_init is the peak
    assert head[-1] < head.max()


def test_sgd_optimizer_and_weight_decay_groups(data):
    X, y = data
    clf = Recorder(**make_clf(optimizer="sgd", learning_rate_init=0.05, max_iter=2,
                              weight_decay=0.3).get_params()).fit(X, y)
    assert clf.optimizer_type_ == "SGD"
    assert clf.score(X, y) >= 0.9
    # Groups: head matrices, head biases, backbone kernels, backbone biases and norms.
    assert clf.decay_ == [0.3, 0.0, 0.3, 0.0]
    l2sp = Recorder(**make_clf(regularization="l2sp", max_iter=1).get_params()).fit(X, y)
    assert l2sp.decay_ == [0.0, 0.0, 0.0, 0.0]  # the L2-SP penalty replaces weight decay


class FirstBatch(FineTuneClassifier):
    def train_step(self, state, images, y):
        self.batches_ = [*getattr(self, "batches_", []), images.clone()]
        return super().train_step(state, images, y)


def test_augmentation_changes_training_images(data):
    X, y = data
    clean = FirstBatch(**make_clf(max_iter=1).get_params()).fit(X, y).batches_[0]
    flipped = FirstBatch(**make_clf(max_iter=1, augment="flip").get_params()).fit(X, y)
    batch = flipped.batches_[0]
    assert clean.shape == batch.shape == (8, 3, SIZE, SIZE)
    # Same shuffling: each image is its un-augmented self or its mirror image.
    same = [torch.equal(a, b) for a, b in zip(batch, clean, strict=True)]
    mirror = [torch.equal(a, b.flip(-1)) for a, b in zip(batch, clean, strict=True)]
    assert all(s or m for s, m in zip(same, mirror, strict=True))
    assert 0 < sum(mirror) < 8
    cropped = FirstBatch(**make_clf(max_iter=1, augment="standard").get_params()).fit(X, y)
    assert not any(torch.equal(a, b) or torch.equal(a, b.flip(-1))
                   for a, b in zip(cropped.batches_[0], clean, strict=True))


@pytest.mark.parametrize("frozen_cache", [None, "memory"])
def test_linear_probe_head_init_is_a_logistic_regression(data, frozen_cache):
    X, y = data
    # Nothing trains (frozen backbone, vanishing learning rate): the network
    # is the logistic regression fitted on FeatureExtractor's features, whether
    # the probe reads them from FeatureExtractor (plain path) or from the
    # frozen trunk's kept outputs.
    clf = make_clf(head_init="linear_probe", freeze="all", max_iter=1, frozen_cache=frozen_cache,
                   learning_rate_init=1e-30).fit(X, y)
    features = FeatureExtractor(tiny_net(), weights=None, image_size=SIZE).fit(X).transform(X)
    probe = LogisticRegression(max_iter=1000).fit(features, y)
    np.testing.assert_allclose(clf.predict_proba(X), probe.predict_proba(features), atol=1e-5)
    head = clf.model_[8]  # two outputs whose difference is the binary probe
    np.testing.assert_allclose((head.weight[1] - head.weight[0]).detach(), probe.coef_[0],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose((head.weight[0] + head.weight[1]).detach(), 0, atol=1e-6)


# ------------------------------------------------------------ early stopping


class Scripted(FineTuneClassifier):
    """Validation scores from a script, indexed by the epoch (from 0)."""

    script = (0.5, 0.9, 0.6, 0.6, 0.95)

    def validation_score(self, state, batches):
        super().validation_score(state, batches)
        return self.script[state.epoch]


def test_early_stopping_stops_and_restores_the_best_epoch(data):
    X, y = data
    clf = Scripted(**make_clf(early_stopping=True, n_iter_no_change=2, max_iter=10,
                              validation_fraction=0.25, callbacks=[Snapshots()]).get_params())
    clf.fit(X, y)
    assert clf.n_iter_ == 4 and len(clf.snapshots_) == 4
    assert clf.validation_scores_ == [0.5, 0.9, 0.6, 0.6]
    assert clf.best_validation_score_ == 0.9 and clf.best_iteration_ == 2
    restored = weights_of(clf.model_)
    assert all(torch.equal(restored[k], clf.snapshots_[1][k].cpu()) for k in restored)
    assert not torch.equal(restored["0.weight"], clf.snapshots_[3]["0.weight"].cpu())


def test_early_stopping_scores_a_stratified_validation_split(data):
    X, y = data
    clf = make_clf(early_stopping=True, validation_fraction=0.25, max_iter=3).fit(X, y)
    assert len(clf.validation_scores_) == clf.n_iter_ == 3
    # 8 held-out images: accuracies are multiples of 1/8.
    assert all(score * 8 == int(score * 8) for score in clf.validation_scores_)
    assert clf.best_validation_score_ == max(clf.validation_scores_)
    with pytest.raises(ValueError, match="early_stopping=True holds out"):
        make_clf(early_stopping=True, validation_fraction=0.01).fit(X[:6], y[:6])


# ---------------------------------------------- warm start, checkpoints, seeds


def test_warm_start_continues_training(data):
    X, y = data
    clf = make_clf(max_iter=1).fit(X, y)
    first = weights_of(clf.model_)
    first_loss = clf.loss_curve_[0]
    clf.set_params(warm_start=True).fit(X, y)
    assert clf.n_iter_ == 2 and clf.loss_curve_[0] == first_loss
    assert not torch.equal(first["0.weight"], clf.model_[0].weight)
    cold = make_clf(max_iter=1).fit(X, y)
    assert cold.n_iter_ == 1
    assert not torch.equal(cold.model_[0].weight, clf.model_[0].weight)
    with pytest.raises(ValueError, match="warm_start=True continues a fit with classes"):
        clf.fit(X, np.where(y == "a", "c", "b"))


class Crash(RuntimeError):
    pass


class CrashAfter(FineTuneClassifier):
    """Dies as its third epoch begins, once the second epoch's checkpoint is written."""

    def begin_epoch(self, state):
        if state.epoch == 2:
            raise Crash
        super().begin_epoch(state)


class CountEpochs(FineTuneClassifier):
    def train_epoch(self, state, batches):
        self.epochs_run_ = getattr(self, "epochs_run_", 0) + 1
        return super().train_epoch(state, batches)


def test_checkpoint_resume_reaches_the_uninterrupted_weights(data, tmp_path):
    X, y = data
    params = make_clf(max_iter=3, augment="flip", early_stopping=True,
                      validation_fraction=0.25, random_state=5).get_params()
    uninterrupted = FineTuneClassifier(**params).fit(X, y)
    path = tmp_path / "run.ckpt"
    with pytest.raises(Crash):
        CrashAfter(**params).set_params(checkpoint=path).fit(X, y)
    assert path.is_file() and os.listdir(tmp_path) == ["run.ckpt"]
    resumed = CountEpochs(**params).set_params(checkpoint=path).fit(X, y)
    assert resumed.epochs_run_ == 1
    assert resumed.loss_curve_ == uninterrupted.loss_curve_
    expected = weights_of(uninterrupted.model_)
    assert all(torch.equal(v, expected[k]) for k, v in weights_of(resumed.model_).items())
    # A finished checkpoint is loaded, not trained again.
    again = CountEpochs(**params).set_params(checkpoint=path).fit(X, y)
    assert getattr(again, "epochs_run_", 0) == 0
    assert np.array_equal(again.predict_proba(X), uninterrupted.predict_proba(X))


def test_checkpoint_of_another_fit_is_replaced_with_a_warning(data, tmp_path):
    X, y = data
    path = tmp_path / "run.ckpt"
    make_clf(max_iter=1, checkpoint=path).fit(X, y)
    with pytest.warns(UserWarning, match="written by a fit with other parameters"):
        clf = CountEpochs(**make_clf(max_iter=1, checkpoint=path).get_params()).fit(X[:-2], y[:-2])
    assert clf.epochs_run_ == 1
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="exists but cannot be read"):
        make_clf(max_iter=1, checkpoint=path).fit(X, y)


def test_same_seed_gives_bit_identical_probabilities(data):
    X, y = data
    params = dict(augment="standard", max_iter=2, random_state=3)
    first = make_clf(**params).fit(X, y).predict_proba(X)
    assert np.array_equal(first, make_clf(**params).fit(X, y).predict_proba(X))
    other = make_clf(**{**params, "random_state": 4}).fit(X, y).predict_proba(X)
    assert not np.array_equal(first, other)


def test_joblib_round_trip_in_a_fresh_process_and_on_a_cpu_only_machine(data, tmp_path):
    X, y = data
    clf = make_clf(max_iter=1).fit(X, y)  # its own: a failure here must not spread
    expected = clf.predict_proba(X)
    np.save(tmp_path / "X.npy", X)
    joblib.dump(clf, tmp_path / "cpu.joblib")
    # Fitted on CUDA: the pickle holds the network on the CPU and names the device.
    cuda = copy.deepcopy(clf).set_params(device="cuda")
    joblib.dump(cuda, tmp_path / "cuda.joblib")
    # Pickling and copying leave the original as it was.
    assert np.array_equal(clf.predict_proba(X), expected)
    script = textwrap.dedent(f"""
        import warnings, joblib, numpy as np, torch
        torch.cuda.is_available = lambda: False
        X = np.load({str(tmp_path / "X.npy")!r})
        for name in ("cpu", "cuda"):
            clf = joblib.load({str(tmp_path)!r} + f"/{{name}}.joblib")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                np.save({str(tmp_path)!r} + f"/{{name}}.npy", clf.predict_proba(X))
            print(name, any("not available" in str(w.message) for w in caught))
    """)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=False, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["cpu", "False", "cuda", "True"]
    for name in ("cpu", "cuda"):
        assert np.array_equal(np.load(tmp_path / f"{name}.npy"), expected)


MIXED = ["a", 1] * 16


@pytest.mark.parametrize(("X_y", "error", "message"), [
    (lambda X, y: (X, np.full(len(y), "a")), ValueError, r"y has a single class \('a'\)"),
    (lambda X, y: (X, y[:-1]), ValueError, "X has 32 images but y has 31 labels"),
    (lambda X, y: (X, None), ValueError, "needs y, one class label per image"),
    (lambda X, y: (X, np.stack([y, y], axis=1)), ValueError, re.escape(
        "y must be one class label per image, as a list or a 1-D array (y should be a 1d "
        "array, got an array of shape (32, 2) instead.)")),
    (lambda X, y: (X, y.reshape(32, 1, 1)), ValueError, re.escape(
        "y must be one class label per image, as a list or a 1-D array (Found array with "
        "dim 3")),
    (lambda X, y: (X, MIXED), TypeError, re.escape(
        "y mixes strings and numbers (y[0] = 'a', y[1] = 1); class labels must be all strings "
        "or all numbers. Convert them first, e.g. y = [str(label) for label in y].")),
    (lambda X, y: (X, np.array(MIXED, dtype=object)), TypeError,
     re.escape("y mixes strings and numbers (y[0] = 'a', y[1] = 1)")),
    (lambda X, y: (X, np.where(np.arange(32) % 10 == 3, np.nan, np.arange(32) % 2)), ValueError,
     re.escape("y has 3 missing labels (None or NaN), at positions [3, 13, 23]. Label those "
               "images, or leave them out of X and y.")),
    (lambda X, y: (X, np.where(np.arange(32) == 5, None, y)), ValueError,
     re.escape("y has 1 missing labels (None or NaN), at positions [5].")),
    (lambda X, y: (X, [np.float32("nan"), *y[1:].tolist()]), ValueError,
     re.escape("y has 1 missing labels (None or NaN), at positions [0].")),
    (lambda X, y: (X, pd.Series(np.arange(32) % 2, dtype="Int64").where(np.arange(32) != 7)),
     ValueError,
     re.escape("y has 1 missing labels (None or NaN), at positions [7].")),
    (lambda X, y: (X, np.linspace(0, 1, 32)), ValueError, re.escape(
        "y must hold class labels, but scikit-learn reads it as 'continuous' values (Unknown "
        "label type: continuous.")),
    (lambda X, y: (X, "a"), ValueError, re.escape(
        "y must be one class label per image, as a list or a 1-D array (y should be a 1d "
        "array, got an array of shape () instead.)")),
])
def test_bad_labels_raise_clear_errors(data, X_y, error, message):
    X, y = X_y(*data)
    with pytest.raises(error, match=message) as info:
        make_clf().fit(X, y)
    assert re.search(r"(^|\W)y\W", str(info.value).split(". ")[0])  # the first sentence names y


def test_a_column_of_labels_is_accepted_with_scikit_learns_warning(data):
    X, y = data
    with pytest.warns(UserWarning, match="A column-vector y was passed"):
        clf = make_clf(max_iter=1).fit(X, y[:, None])
    assert clf.classes_.tolist() == ["a", "b"]


@pytest.mark.parametrize(("where", "message"), [
    (lambda tmp: tmp, "is a folder; pass the path of a file in it, e.g. checkpoint={!r}."),
    (lambda tmp: tmp / "notes.txt" / "run.ckpt",
     "cannot be written: {!r} is a file, not a folder. Choose another path."),
    (lambda tmp: tmp / "notes.txt" / "deeper" / "run.ckpt",
     "cannot be written: {!r} is a file, not a folder. Choose another path."),
])
def test_unusable_checkpoint_paths_are_refused_before_any_image_is_read(tmp_path, where,
                                                                        message):
    (tmp_path / "notes.txt").write_text("a file")
    path = where(tmp_path)
    named = tmp_path / "fit.ckpt" if path == tmp_path else tmp_path / "notes.txt"
    with pytest.raises(ValueError) as info:  # the images do not exist: never read
        make_clf(checkpoint=path).fit(["/nonexistent.png", "/nonexistent2.png"], ["a", "b"])
    assert str(info.value) == f"checkpoint={str(path)!r} " + message.format(str(named))


def test_a_checkpoint_in_a_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)  # chmod does not stop root
    path = tmp_path / "runs" / "run.ckpt"
    with pytest.raises(ValueError) as info:
        make_clf(checkpoint=path).fit(["/nonexistent.png", "/nonexistent2.png"], ["a", "b"])
    assert str(info.value) == (
        f"checkpoint={str(path)!r} cannot be written: the folder {str(tmp_path)!r} is not "
        "writable (Permission denied). Choose a path in a folder you can write to.")
    assert os.listdir(tmp_path) == []  # the missing folder was not created


def test_checkpoint_expands_the_home_folder(data, tmp_path, monkeypatch):
    X, y = data
    monkeypatch.setenv("HOME", str(tmp_path))
    make_clf(max_iter=1, checkpoint="~/runs/fit.ckpt").fit(X, y)
    assert os.listdir(tmp_path / "runs") == ["fit.ckpt"]
    again = CountEpochs(**make_clf(max_iter=1, checkpoint="~/runs/fit.ckpt").get_params())
    assert getattr(again.fit(X, y), "epochs_run_", 0) == 0  # the same file, read back


def test_bad_parameters_and_backbones_raise_clear_errors(data):
    X, y = data
    with pytest.raises(InvalidParameterError, match="'optimizer' parameter"):
        make_clf(optimizer="adam").fit(X, y)
    no_linear = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match=r"has no nn\.Linear layer to replace"):
        make_clf(backbone=no_linear).fit(X, y)
    with pytest.raises(ValueError, match="is not available on this machine"):
        make_clf(device="cuda:7").fit(X, y)
    with pytest.raises(ValueError, match="Image 0"):
        make_clf().fit(["/nonexistent.png", "/nonexistent2.png"], ["a", "b"])


def test_image_files_and_verbose_progress(data, tmp_path, capsys):
    X, y = data
    paths = []
    for i, image in enumerate(X):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    # Augmented views are seeded per image: decoding threads change nothing.
    from_files = make_clf(max_iter=1, augment="standard", num_workers=2,
                          verbose=1).fit(paths, y)
    err = capsys.readouterr().err
    assert err.startswith(f"epoch 1/1: loss {from_files.loss_curve_[0]:.4f} (")
    from_arrays = make_clf(max_iter=1, augment="standard", num_workers=0).fit(X, y)
    assert from_files.loss_curve_ == from_arrays.loss_curve_
    assert np.array_equal(from_files.predict_proba(paths), from_arrays.predict_proba(X))


# ------------------------------------------------------------------- threads

_THREADS_SEEN: list[int] = []


class _RecordThreads(nn.Module):
    """Notes the torch threads of each forward pass (in a list that survives deep copies)."""

    def forward(self, x):
        _THREADS_SEEN.append(torch.get_num_threads())
        return x


def test_n_threads_holds_for_fit_and_prediction_and_is_restored(data, monkeypatch):
    import skt.extract._engines as engines
    X, y = data
    run = engines.TorchEngine.__call__

    def recording(engine, batch):  # prediction runs a traced copy: note the threads here
        _THREADS_SEEN.append(torch.get_num_threads())
        return run(engine, batch)

    monkeypatch.setattr(engines.TorchEngine, "__call__", recording)
    net = nn.Sequential(_RecordThreads(), *tiny_net())
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        clf = make_clf(backbone=net, n_threads=1, max_iter=1).fit(X, y)
        assert _THREADS_SEEN and set(_THREADS_SEEN) == {1}
        _THREADS_SEEN.clear()
        clf.predict_proba(X)
        assert _THREADS_SEEN and set(_THREADS_SEEN) == {1}
        assert torch.get_num_threads() == 2
        _THREADS_SEEN.clear()
        clf.set_params(n_threads=None).predict(X)
        assert set(_THREADS_SEEN) == {2}
    finally:
        torch.set_num_threads(previous)
        _THREADS_SEEN.clear()
