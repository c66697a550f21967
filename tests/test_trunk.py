"""The frozen trunk computed once per image and view (skt/training/_trunk.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from skt.backbones import resolve_backbone
from skt.images import Preprocessing, as_image_list, dihedral_view, preprocess
from skt.training import Callback, ImageBatches, Trunk, TrunkStore, _trunk, split_network

from .test_finetune import SIZE, Crash, make_clf, make_images, tiny_net, weights_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_STAGES = (("0", "1"), ("3", "4"))


@pytest.fixture(scope="module")
def data():
    return make_images()


class Skip(nn.Module):
    """A later stage that reads the input image as well as the first stage's output."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 3, 3, padding=1)
        self.second = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.second(self.first(x) + x)


class Branchy(nn.Module):
    """A data-dependent branch: FX cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 3, 3, padding=1)
        self.second = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        x = self.first(x)
        return self.second(x) if x.sum() > 0 else x


class Doubling(nn.Module):
    """Doubles its input in training mode only, by a Python branch that tracing fixes."""

    def forward(self, x):
        return x * 2 if self.training else x


@pytest.mark.parametrize(("backbone", "n_frozen", "shape"), [
    ("efficientnet_lite0", 3, (2, 24, 8, 8)),
    ("resnet18", 2, (2, 64, 8, 8)),
    ("mobilenet_v3_small", 8, (2, 1024)),  # every stage: the rest is pooling and classifier
])
def test_split_network_rest_of_trunk_is_the_network(backbone, n_frozen, shape):
    resolved = resolve_backbone(backbone, None, image_size=32, random_state=0)
    model = resolved.model.eval()
    trunk = split_network(model, resolved.stages, n_frozen)
    x = torch.randn(2, 3, 32, 32)
    features = trunk.features(x)
    assert tuple(features.shape) == shape and not features.requires_grad
    torch.testing.assert_close(trunk.rest(features, training=False), model(x),
                               rtol=1e-4, atol=1e-5)
    # the rest trains the network's own parameters
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for p in trunk.rest_train.module.parameters())


def test_split_network_needs_one_tensor_between_the_parts_and_a_traceable_graph():
    model = tiny_net()
    assert split_network(model, TINY_STAGES, 0) is None
    assert split_network(Skip(), (("first",), ("second",)), 1) is None
    assert split_network(Branchy(), (("first",), ("second",)), 1) is None
    trunk = split_network(model, TINY_STAGES, 1)
    assert isinstance(trunk, Trunk) and trunk.n_frozen == 1


def test_split_network_traces_the_rest_in_both_modes_and_keeps_module_modes():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Doubling(), nn.Flatten())
    model[0].train()
    model[1].eval()
    trunk = split_network(model, (("0",), ("1",)), 1)
    assert model[0].training and not model[1].training  # as they were
    x = torch.randn(2, 3, 2, 2)
    features = trunk.features(x)
    with torch.no_grad():
        torch.testing.assert_close(trunk.rest(features, training=True), 2 * features.flatten(1))
        torch.testing.assert_close(trunk.rest(features, training=False), features.flatten(1))


@pytest.mark.parametrize("location", ["memory", "disk"])
def test_trunk_store_round_trip_channels_last(location, tmp_path):
    store = TrunkStore(5, 8, location, max_filled=2, folder=tmp_path)
    features = torch.randn(3, 4, 2, 3)
    store.put(np.array([4, 0, 2]), np.array([7, 0, 3]), features)
    assert store.on_disk == (location == "disk")
    assert store.filled.sum() == 3 and store.filled[4, 7] and store.filled[2, 3]
    batch = store.get(np.array([2, 4]), np.array([3, 7]))
    torch.testing.assert_close(batch, features[[2, 0]], rtol=0, atol=0)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    store.close()
    assert os.listdir(tmp_path) == []  # the file went with it


def test_trunk_store_auto_goes_to_disk_beyond_the_memory_budget(monkeypatch, tmp_path):
    monkeypatch.setattr(_trunk, "MEMORY_BYTES", 4 * 10 * 2 * 6 - 1)  # 10 items, 2 views, 6 floats
    store = TrunkStore(10, 8, "auto", max_filled=2, folder=tmp_path)
    store.put(np.array([0]), np.array([0]), torch.ones(1, 6))
    assert store.on_disk
    small = TrunkStore(10, 8, "auto", max_filled=1, folder=tmp_path)
    small.put(np.array([0]), np.array([0]), torch.ones(1, 6))
    assert not small.on_disk
    store.close()


def unwritable_folder(tmp_path):
    """A folder that cannot be created, even by root: its parent is a file."""
    (tmp_path / "blocker").write_text("a file")
    return tmp_path / "blocker" / "cache"


def test_trunk_store_auto_keeps_in_memory_what_its_folder_cannot_hold(monkeypatch, tmp_path):
    monkeypatch.setattr(_trunk, "MEMORY_BYTES", 1)
    folder = unwritable_folder(tmp_path)
    store = TrunkStore(4, 2, "auto", max_filled=2, folder=folder)
    with pytest.warns(RuntimeWarning) as caught:
        store.put(np.array([1, 3]), np.array([0, 1]), torch.ones(2, 6))
    assert [str(w.message) for w in caught] == [
        f"Cannot create the frozen stages' file in {folder} (Not a directory). Keeping the "
        "frozen stages' outputs in memory instead (0.0 GiB)."]
    assert not store.on_disk
    torch.testing.assert_close(store.get(np.array([3]), np.array([1])), torch.ones(1, 6))


def test_trunk_store_on_disk_names_the_folder_it_cannot_write(tmp_path):
    folder = unwritable_folder(tmp_path)
    with pytest.raises(OSError, match=f"^.*Cannot create the frozen stages' file in {folder} "
                                      r"\(Not a directory\)\.$"):
        TrunkStore(4, 1, "disk", folder=folder).put(np.array([0]), np.array([0]),
                                                     torch.ones(1, 6))
    with pytest.raises(NotADirectoryError, match=str(folder)):
        TrunkStore.check_folder(folder)
    TrunkStore.check_folder(tmp_path / "new")
    assert os.listdir(tmp_path / "new") == []  # created, and left empty


def test_trunk_store_leaves_no_folder_when_its_file_cannot_be_made(monkeypatch, tmp_path):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np.lib.format, "open_memmap", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        TrunkStore(4, 1, "disk", folder=tmp_path).put(np.array([0]), np.array([0]),
                                                       torch.ones(1, 6))
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(_trunk, "MEMORY_BYTES", 1)
    with pytest.warns(RuntimeWarning, match="No space left on device"):
        TrunkStore(4, 1, "auto", folder=tmp_path).put(np.array([0]), np.array([0]),
                                                       torch.ones(1, 6))
    assert os.listdir(tmp_path) == []


class Identity:
    """A stand-in trunk that returns its input, and counts what it computes."""

    n_frozen = 1

    def __init__(self) -> None:
        self.computed = 0

    def features(self, images):
        self.computed += len(images)
        return images.clone()


@pytest.mark.parametrize("augment", [None, "flip", "dihedral"])
def test_trunk_batches_hold_each_drawn_view_of_the_right_image_computed_once(augment):
    X, y = make_images(n=12)
    labels = (y == "b").astype(int)
    config = Preprocessing(crop_size=SIZE, resize_size=SIZE)
    images = as_image_list(X)
    expected = [preprocess(torch.as_tensor(x).permute(2, 0, 1), config) for x in X]
    indices = [1, 2, 3, 5, 7, 8, 10, 11]
    batches = ImageBatches(images, labels, indices, config, 3, augment=augment, shuffle=True,
                           generator=torch.Generator().manual_seed(0), max_epochs=4)
    trunk = Identity()
    batches.use_trunk(trunk, torch.device("cpu"))
    views_of = {i: set() for i in indices}
    for _ in range(4):
        for features, y_batch in batches:
            for feature, label in zip(features, y_batch, strict=True):
                matches = [(i, v) for i in indices for v in range(8)
                           if torch.equal(feature, dihedral_view(expected[i], v))]
                assert matches, "a batch holds something that is no view of any image"
                i, view = matches[0]
                assert label == labels[i]  # never misaligned with y
                views_of[i].add(view)
    allowed = {None: {0}, "flip": {0, 4}, "dihedral": set(range(8))}[augment]
    drawn = set().union(*views_of.values())
    assert drawn <= allowed and (augment is None or len(drawn) > 1)
    assert trunk.computed == int(batches._store.filled.sum())
    assert trunk.computed <= 4 * len(indices)
    if augment is None:
        assert trunk.computed == len(indices)  # once per image, whatever the epochs
    batches.close()
    assert batches._store is None


class RecordTrunk(Callback):
    def on_epoch_end(self, estimator, state):
        state.history[-1]["trunk"] = None if state.trunk is None else state.trunk.n_frozen


@pytest.mark.parametrize("params", [
    {"freeze": 2},
    {"freeze": 1, "early_stopping": True, "validation_fraction": 0.25},
    {"freeze": 2, "unfreeze_schedule": 1, "max_iter": 3},
    {"freeze": 1, "regularization": "l2sp", "class_weight": "balanced"},
])
def test_reusing_the_frozen_trunk_trains_the_same_weights(data, params):
    X, y = data
    plain = make_clf(frozen_cache=None, callbacks=[RecordTrunk()], **params).fit(X, y)
    reused = make_clf(callbacks=[RecordTrunk()], **params).fit(X, y)
    schedule = {2: [2, 1, None], 1: [1, 1]}[params["freeze"]] if "unfreeze_schedule" in params \
        else [params["freeze"]] * 2
    assert [row["trunk"] for row in reused.history_] == schedule
    assert [row["trunk"] for row in plain.history_] == [None] * len(schedule)
    before, after = weights_of(plain.model_), weights_of(reused.model_)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reused.loss_curve_, plain.loss_curve_, rtol=1e-4)
    assert reused.validation_scores_ == plain.validation_scores_


def test_dihedral_augmentation_trains_on_the_trunk_and_disk_storage_changes_nothing(
        data, tmp_path, monkeypatch):
    X, y = data
    monkeypatch.setenv("SKT_CACHE_DIR", str(tmp_path))
    closed = []
    close = TrunkStore.close

    def spy(store):
        closed.append(store.on_disk)
        close(store)

    monkeypatch.setattr(TrunkStore, "close", spy)
    memory = make_clf(freeze=1, augment="dihedral", max_iter=3, frozen_cache="memory",
                      callbacks=[RecordTrunk()]).fit(X, y)
    disk = make_clf(freeze=1, augment="dihedral", max_iter=3, frozen_cache="disk").fit(X, y)
    assert [row["trunk"] for row in memory.history_] == [1, 1, 1]
    assert closed == [False, True]  # one store per fit, the second in a file
    assert memory.loss_curve_ == disk.loss_curve_
    assert os.listdir(tmp_path) == []  # the temporary file is gone after fit


def test_a_resumed_fit_on_the_trunk_ends_like_an_uninterrupted_one(data, tmp_path):
    from .test_finetune import CrashAfter

    X, y = data
    params = dict(freeze=1, augment="dihedral", max_iter=3, checkpoint=tmp_path / "ckpt.pt")
    with pytest.raises(Crash):
        CrashAfter(**make_clf(**params).get_params()).fit(X, y)
    resumed = make_clf(**params).fit(X, y)
    whole = make_clf(**{**params, "checkpoint": None}).fit(X, y)
    assert resumed.loss_curve_ == whole.loss_curve_


@pytest.mark.parametrize(("params", "obstacle"), [
    ({"freeze": None}, "no stage is frozen (freeze must be a stage count, 'auto' or 'all')"),
    ({"freeze": 1, "augment": "standard"},
     "augment='standard' draws random crops, not one of a few fixed views"),
    ({"freeze": 1, "regularization": "lwf"},
     "regularization='lwf' runs the original network on the images"),
])
def test_insisting_on_the_frozen_cache_where_it_cannot_work(data, params, obstacle):
    X, y = data
    with pytest.raises(ValueError) as info:
        make_clf(frozen_cache="memory", **params).fit(X, y)
    assert str(info.value) == (
        f"frozen_cache='memory' keeps the output of the frozen stages, but {obstacle}. Use "
        "frozen_cache='auto' (which then runs the whole network every step) or None.")
    clf = make_clf(frozen_cache="auto", max_iter=1, callbacks=[RecordTrunk()], **params)
    assert clf.fit(X, y).history_[0]["trunk"] is None  # the plain path


def test_auto_takes_the_plain_path_for_an_untraceable_network(data):
    X, y = data

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = tiny_net()[:6]
            self.fc = nn.Linear(16, 2)

        def forward(self, x):
            x = self.body(x)
            x = x.mean((2, 3)) if x.sum() != 0 else x.amax((2, 3))
            return self.fc(x)

    clf = make_clf(backbone=Untraceable(), freeze=1, max_iter=1,
                   callbacks=[RecordTrunk()]).fit(X, y)
    assert clf.history_[0]["trunk"] is None


@pytest.mark.parametrize("tta", ["flip", "dihedral"])
def test_test_time_augmentation_averages_the_logits_of_the_views(data, tta):
    X, y = data
    clf = make_clf(max_iter=1, tta=tta).fit(X, y)
    config = clf.preprocessing_
    batch = torch.stack([preprocess(torch.as_tensor(x).permute(2, 0, 1), config) for x in X[:6]])
    views = [0, 4] if tta == "flip" else list(range(8))
    with torch.no_grad():
        logits = torch.stack([clf.model_(dihedral_view(batch, v)) for v in views]).mean(0)
    np.testing.assert_allclose(clf.decision_function(X[:6]), (logits[:, 1] - logits[:, 0]).numpy(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(clf.predict_proba(X[:6]), torch.softmax(logits.double(), 1),
                               rtol=1e-4, atol=1e-6)
    plain = clf.set_params(tta=None).decision_function(X[:6])
    assert not np.allclose(plain, (logits[:, 1] - logits[:, 0]).numpy(), atol=1e-4)
    # features are those of the image as given
    np.testing.assert_array_equal(clf.transform(X[:6]), clf.set_params(tta=tta).transform(X[:6]))


def test_freeze_auto_trains_the_last_third_of_the_stages_on_the_trunk(data):
    X, y = data
    model = resolve_backbone("resnet18", None, image_size=32, random_state=0).model
    before = weights_of(model)
    clf = make_clf(backbone=model, freeze="auto", max_iter=1, callbacks=[RecordTrunk()]).fit(X, y)
    after = weights_of(clf.model_)
    # as a user module, its stages are its children with parameters: conv1, bn1,
    # layer1, layer2 (frozen), layer3, layer4 (trained); as "resnet18", conv1+bn1 is one
    assert clf.history_[0]["trunk"] == 4
    for prefix in ("conv1.", "layer1.", "layer2."):
        assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))
    for prefix in ("layer3.", "layer4."):
        assert not all(torch.equal(before[k], after[k]) for k in before
                       if k.startswith(prefix) and k.endswith("weight"))


def test_the_linear_probe_reads_the_kept_trunk_outputs_so_each_image_passes_once(data):
    from skt.finetune import FineTuneClassifier

    X, y = data
    computed = []

    class Counting(FineTuneClassifier):
        def init_state(self, *args, **kwargs):
            state = super().init_state(*args, **kwargs)
            features = state.trunk.features
            state.trunk.features = lambda images: computed.append(len(images)) or features(images)
            return state

    clf = Counting(**make_clf(freeze=1, head_init="linear_probe", max_iter=3).get_params())
    clf.fit(X, y)
    assert sum(computed) == len(X)  # the probe's pass, then three epochs of reading


class Dropping(nn.Module):
    """A dropout between two frozen stages, and a parameter of its own in the first stage."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.second = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.head(self.second(self.drop(self.first(x * self.scale)))))


class ModesAtFirstBatch(Callback):
    def on_batch_end(self, estimator, state, loss):
        if state.epoch == 0 and not hasattr(estimator, "modes_"):
            estimator.modes_ = {name: module.training
                                for name, module in state.model.named_modules() if name}


def test_modules_the_trunk_calls_run_in_eval_mode_and_parameter_stages_are_frozen(data):
    from skt.backbones import list_stages

    X, y = data
    model = Dropping()
    stages = list_stages(model)
    assert stages[0] == ("scale", "first")  # a parameter joins the first stage
    clf = make_clf(backbone=model, freeze=2, max_iter=1,
                   callbacks=[RecordTrunk(), ModesAtFirstBatch()]).fit(X, y)
    assert clf.history_[0]["trunk"] == 2
    assert clf.modes_["drop"] is False and clf.modes_["first"] is False
    assert clf.modes_["fc"] is True
    assert torch.equal(clf.model_.scale.detach(), torch.ones(()))  # frozen
