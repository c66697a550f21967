"""Faults during FineTuneClassifier.fit: damaged checkpoints, unreadable images, interrupts,
a cache folder that cannot be written.

A fit that fails leaves the classifier as it was, and nothing behind: no
decoding thread, no file of the frozen stages' outputs, grad mode on.
"""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.exceptions import NotFittedError

from skt.training import Callback, Trunk, _trunk

from .test_finetune import CountEpochs, make_clf, make_images, weights_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return make_images()


@pytest.fixture
def png_files(data, tmp_path):
    """The tiny images as PNG files: with num_workers=2, threads decode them."""
    X, y = data
    paths = []
    for i, image in enumerate(X):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    return paths, y


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """skt's cache folder, where a file of the frozen stages' outputs goes."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("SKT_CACHE_DIR", str(folder))
    return folder


def damage(path) -> None:
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)


def decode_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate()
            if thread.name.startswith("skt-decode")]


def left_in(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def assert_released(folder) -> None:
    """What a failed fit must not leave behind."""
    assert decode_threads() == []
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert [name for name in left_in(folder) if name.startswith("skt-trunk-")] == []


# ------------------------------------------------------------------ checkpoints


def test_a_damaged_checkpoint_is_refused_and_nothing_is_trained(data, tmp_path):
    X, y = data
    path = tmp_path / "run.ckpt"
    params = make_clf(max_iter=1, checkpoint=path).get_params()
    clf = CountEpochs(**params).fit(X, y)
    before, proba = weights_of(clf.model_), clf.predict_proba(X)
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF  # inside the network's weights
    path.write_bytes(bytes(content))
    message = (f"checkpoint={str(path)!r} is damaged: its content does not match the checksum "
               "written with it (a disk or copy error, or an edit). Nothing was loaded from it. "
               "Delete it to start afresh, or choose another path.")
    with pytest.raises(ValueError) as info:
        clf.fit(X, y)
    assert str(info.value) == message
    assert clf.epochs_run_ == 1  # no epoch ran in the failed fit
    assert all(torch.equal(v, before[k]) for k, v in weights_of(clf.model_).items())
    assert np.array_equal(clf.predict_proba(X), proba)
    fresh = CountEpochs(**params)
    with pytest.raises(ValueError, match="is damaged"):
        fresh.fit(X, y)
    assert not hasattr(fresh, "epochs_run_")
    with pytest.raises(NotFittedError):
        fresh.predict(X)
    path.unlink()  # as the message says: then the fit starts afresh
    assert CountEpochs(**params).fit(X, y).epochs_run_ == 1


# ------------------------------------------------------- images that cannot be read


@pytest.mark.parametrize("params", [
    {"freeze": 1, "frozen_cache": "disk"},  # the frozen trunk, its outputs in a file
    {"freeze": 1, "frozen_cache": None, "augment": "flip"},  # the whole network
    {"freeze": None, "early_stopping": True, "validation_fraction": 0.25},
])
def test_an_unreadable_image_fails_the_fit_and_leaves_nothing_behind(png_files, cache_dir,
                                                                     params):
    paths, y = png_files
    damage(paths[29])
    clf = make_clf(max_iter=2, num_workers=2, **params)
    with pytest.raises(ValueError, match=r"Image 29 .* cannot be read as an image") as kept:
        clf.fit(paths, y)
    assert kept.value.__traceback__ is not None  # kept, with every frame of the fit
    assert_released(cache_dir)
    with pytest.raises(NotFittedError):
        clf.predict(paths[:2])


class Spoil(Callback):
    """Damages the image files as the first epoch ends, so that the second cannot read them."""

    def __init__(self, paths):
        self.paths = paths

    def on_epoch_end(self, estimator, state):
        if state.epoch == 1:
            for path in self.paths:
                damage(path)


def test_images_that_break_in_the_second_epoch_keep_the_previous_fit(data, png_files, cache_dir):
    X, _ = data
    paths, y = png_files
    clf = make_clf(max_iter=1, num_workers=2).fit(paths, y)
    proba, n_iter = clf.predict_proba(X), clf.n_iter_
    # Dihedral views: the second epoch decodes images again for the views it draws first.
    clf.set_params(freeze=1, augment="dihedral", frozen_cache="disk", max_iter=3,
                   callbacks=[Spoil(paths)])
    with pytest.raises(ValueError, match=r"Image \d+ .* cannot be read as an image"):
        clf.fit(paths, y)
    assert_released(cache_dir)
    assert clf.n_iter_ == n_iter
    assert np.array_equal(clf.predict_proba(X), proba)


def test_an_interrupt_in_the_frozen_trunk_stops_the_decoding_threads(png_files, cache_dir,
                                                                      monkeypatch):
    paths, y = png_files
    features, calls = Trunk.features, []

    def interrupted(trunk, images):
        calls.append(len(images))
        if len(calls) == 2:  # mid-epoch, while threads decode the next images
            raise KeyboardInterrupt
        return features(trunk, images)

    monkeypatch.setattr(Trunk, "features", interrupted)
    clf = make_clf(freeze=1, frozen_cache="disk", num_workers=2)
    with pytest.raises(KeyboardInterrupt) as kept:
        clf.fit(paths, y)
    assert kept.traceback  # IPython keeps it too, as sys.last_value
    assert len(calls) == 2
    assert_released(cache_dir)
    assert not hasattr(clf, "model_")


# ------------------------------------------------- a cache folder that cannot be written


@pytest.fixture
def unwritable_cache(tmp_path, monkeypatch):
    """$SKT_CACHE_DIR under a file: it cannot be created, even by root."""
    (tmp_path / "blocker").write_text("a file")
    folder = tmp_path / "blocker" / "cache"
    monkeypatch.setenv("SKT_CACHE_DIR", str(folder))
    return folder


def test_auto_frozen_cache_falls_back_with_one_warning_naming_the_folder(data, unwritable_cache,
                                                                         monkeypatch):
    X, y = data
    expected = make_clf(freeze=1, frozen_cache="memory").fit(X, y).loss_curve_
    monkeypatch.setattr(_trunk, "MEMORY_BYTES", 1)  # "auto" wants a file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf = make_clf(freeze=1, frozen_cache="auto").fit(X, y)
    naming = [str(w.message) for w in caught if str(unwritable_cache) in str(w.message)]
    assert len(naming) == 1, naming
    assert clf.loss_curve_ == expected


def test_disk_frozen_cache_in_a_folder_that_cannot_be_written_is_an_error(data, unwritable_cache):
    X, y = data
    clf = CountEpochs(**make_clf(freeze=1, frozen_cache="disk").get_params())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError) as info:
            clf.fit(X, y)
    message = str(info.value)
    assert message.startswith("frozen_cache='disk' keeps the output of the frozen stages in a "
                              "file in skt's cache folder")
    assert message.endswith("Set SKT_CACHE_DIR to a writable folder, or use "
                            "frozen_cache='auto' or 'memory'.")
    # Named in the error, or in the cache's own warning that the error points to.
    assert str(unwritable_cache) in message + "".join(str(w.message) for w in caught)
    assert not hasattr(clf, "epochs_run_")
