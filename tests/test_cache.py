"""The feature cache: one forward pass per image, across fits, folds and processes."""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline, make_pipeline

import skt.cache
from skt import FeatureExtractor, cache_info, clear_cache
from skt.cache import (
    FORMAT_VERSION,
    FeatureCache,
    check_cache_writable,
    default_cache_dir,
    fingerprint,
    fingerprint_module,
    forget_memory,
    open_cache,
    seal,
    unseal,
)
from skt.extract import TorchEngine

from .conftest import TINY


class ForwardCounter:
    """Counts, per distinct preprocessed image, how often it went through the network."""

    def __init__(self, monkeypatch):
        self.seen = collections.Counter()
        original = TorchEngine.__call__

        def counting(engine, batch):
            for row in batch:
                self.seen[hash(row.numpy().tobytes())] += 1
            return original(engine, batch)

        monkeypatch.setattr(TorchEngine, "__call__", counting)

    @property
    def total(self):
        return sum(self.seen.values())

    def reset(self):
        self.seen.clear()


@pytest.fixture
def counter(monkeypatch):
    return ForwardCounter(monkeypatch)


@pytest.fixture
def labelled(rng):
    """30 distinct 32 px images, two classes by brightness."""
    X = rng.integers(0, 128, size=(30, 32, 32, 3), dtype=np.uint8)
    y = np.arange(30) % 2
    X[y == 1] += 100
    return X, y


def _search(cache, **params):
    pipe = make_pipeline(FeatureExtractor(**{**TINY, **params}, cache=cache),
                         LogisticRegression(max_iter=500))
    grid = {"logisticregression__C": [0.01, 0.1, 1, 10, 100, 1000]}
    return GridSearchCV(pipe, grid, cv=5)


def test_grid_search_runs_each_image_through_the_backbone_once(labelled, counter, tmp_path):
    X, y = labelled
    first = _search(tmp_path).fit(X, y)
    assert len(counter.seen) == 30 and set(counter.seen.values()) == {1}

    counter.reset()
    second = _search(tmp_path).fit(X, y)
    assert counter.total == 0
    np.testing.assert_array_equal(first.cv_results_["mean_test_score"],
                                  second.cv_results_["mean_test_score"])

    for changed in ({"random_state": 1}, {"image_size": 40}, {"mean": 0.5}):
        counter.reset()
        _search(tmp_path, **changed).fit(X, y)
        assert counter.total == 30, changed


def test_cached_features_equal_uncached(labelled, tmp_path):
    X, _ = labelled
    plain = FeatureExtractor(**TINY, layers="layer3").fit(X).transform(X)
    cached = FeatureExtractor(**TINY, layers="layer3", cache=tmp_path).fit(X)
    np.testing.assert_array_equal(cached.transform(X), plain)  # cold
    np.testing.assert_array_equal(cached.transform(X), plain)  # warm


def test_pooling_and_layer_subsets_need_no_forward_pass(labelled, counter, tmp_path):
    X, _ = labelled
    extractor = FeatureExtractor(**TINY, layers=["layer2", "layer3", "layer4"], cache=tmp_path)
    extractor.fit(X).transform(X)
    assert counter.total == 30
    counter.reset()
    variants = ({"pooling": "max"}, {"pooling": "gem"}, {"pooling": "avgmax"},
                {"layers": "layer3"}, {"layers": ["layer4", "layer2"], "pooling": "max"})
    cached = []
    for params in variants:
        features = extractor.set_params(**params).fit(X).transform(X)
        cached.append((extractor.get_params(), features))
    assert counter.total == 0
    for params, features in cached:
        reference = FeatureExtractor(**{**params, "cache": None}).fit(X).transform(X)
        np.testing.assert_allclose(features, reference, rtol=1e-6, atol=1e-7)
    counter.reset()
    extractor.set_params(layers="layer3", pooling="flatten").fit(X).transform(X)
    assert counter.total == 30  # the whole map is stored separately


def test_same_file_content_under_another_name_hits(image_files, counter, tmp_path):
    extractor = FeatureExtractor(**TINY, cache=tmp_path / "cache").fit(image_files)
    extractor.transform(image_files)
    copy = tmp_path / "renamed.png"
    copy.write_bytes(open(image_files[0], "rb").read())
    counter.reset()
    extractor.transform([str(copy)])
    assert counter.total == 0


def test_changed_user_module_weights_miss(images, counter, tmp_path):
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                 torch.nn.Flatten(), torch.nn.Linear(4, 2))
    FeatureExtractor(module, image_size=32, engine="torch", cache=tmp_path).fit(images).transform(
        images)
    with torch.no_grad():
        module[0].weight.add_(1)
    counter.reset()
    FeatureExtractor(module, image_size=32, engine="torch", cache=tmp_path).fit(images).transform(
        images)
    assert counter.total == 8


def test_damaged_entry_is_discarded_and_recomputed(images, counter, tmp_path):
    extractor = FeatureExtractor(**TINY, cache=tmp_path).fit(images)
    clean = extractor.transform(images)
    entries = sorted(p for p in (tmp_path / "skt-features").rglob("*")
                     if p.is_file() and not p.name.startswith(".") and p.name != "config.json")
    assert len(entries) == 8
    entries[3].write_bytes(entries[3].read_bytes()[:50])  # truncated
    forget_memory()  # as in a new process: read from disk
    counter.reset()
    with pytest.warns(RuntimeWarning, match="Discarding damaged feature-cache entry"):
        again = extractor.transform(images)
    assert counter.total == 1
    # Recomputed in a batch of 1, not 8: oneDNN may pick another convolution algorithm,
    # so float32 sums differ in the last bits (seen: 1.2e-6 on features of about 0.01-1).
    np.testing.assert_allclose(again, clean, rtol=1e-5, atol=1e-5)


KILLED_WRITER = """
import os, signal, numpy as np
from skt import FeatureExtractor
import skt.cache
writes = []
original = skt.cache.atomic_write
def dying_write(path, data):
    if path.name != "config.json":
        writes.append(path)
        if len(writes) == 5:  # half of the fifth entry reaches the disk, then the process dies
            temporary = path.with_name("." + path.name + ".tmp")
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    original(path, data)
skt.cache.atomic_write = dying_write
X = np.load({X!r})
FeatureExtractor(backbone="resnet18", weights=None, image_size=32, random_state=0, engine="torch",
                 batch_size=4, cache={cache!r}).fit(X).transform(X)
"""


def test_worker_killed_mid_write_leaves_no_corrupt_entry(images, counter, tmp_path):
    np.save(tmp_path / "X.npy", images)
    cache = tmp_path / "cache"
    script = KILLED_WRITER.format(X=str(tmp_path / "X.npy"), cache=str(cache))
    result = subprocess.run([sys.executable, "-c", script])
    assert result.returncode == -9
    assert cache_info(cache)["entries"] == 4
    counter.reset()
    features = FeatureExtractor(**TINY, batch_size=4, cache=cache).fit(images).transform(images)
    assert counter.total == 4
    np.testing.assert_allclose(features, FeatureExtractor(**TINY).fit(images).transform(images),
                               rtol=1e-5, atol=1e-6)


CONCURRENT_WORKER = """
import numpy as np
from skt import FeatureExtractor
from skt.extract import TorchEngine
count = 0
original = TorchEngine.__call__
def counting(engine, batch):
    global count
    count += len(batch)
    return original(engine, batch)
TorchEngine.__call__ = counting
X = np.load({X!r})
FeatureExtractor(backbone="resnet18", weights=None, image_size=32, random_state=0, engine="torch",
                 batch_size=2, cache={cache!r}).fit(X).transform(X)
print(count)
"""


def test_two_processes_share_the_work(images, tmp_path):
    np.save(tmp_path / "X.npy", images)
    script = CONCURRENT_WORKER.format(X=str(tmp_path / "X.npy"), cache=str(tmp_path / "c"))
    workers = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                text=True) for _ in range(2)]
    counts = [int(worker.communicate()[0]) for worker in workers]
    assert sum(counts) == 8 and sorted(counts)[0] == 0


def test_joblib_memory_and_pipeline_memory(labelled, counter, tmp_path):
    X, y = labelled
    memory = joblib.Memory(tmp_path / "joblib", verbose=0)
    FeatureExtractor(**TINY, cache=memory).fit(X).transform(X)
    assert cache_info(tmp_path / "joblib")["entries"] == 30

    counter.reset()
    steps = [("features", FeatureExtractor(**TINY)), ("head", LogisticRegression())]
    first = Pipeline(steps, memory=str(tmp_path / "pipe")).fit(X, y)
    assert counter.total == 30
    second = Pipeline(steps, memory=str(tmp_path / "pipe")).fit(X, y)
    assert counter.total == 30  # the fitted extractor and its output came from the memory
    np.testing.assert_array_equal(first.predict_proba(X), second.predict_proba(X))


def test_entries_stay_in_memory_until_forgotten(images, counter, tmp_path):
    extractor = FeatureExtractor(**TINY, cache=tmp_path).fit(images)
    first = extractor.transform(images)
    clear_cache(tmp_path)  # also forgets the copies in memory
    counter.reset()
    np.testing.assert_array_equal(extractor.transform(images), first)
    assert counter.total == 8
    entries = [p for p in (tmp_path / "skt-features").rglob("*")
               if p.is_file() and not p.name.startswith(".") and p.name != "config.json"]
    assert len(entries) == 8
    for entry in entries:
        entry.unlink()  # the files are gone; this process still has them in memory
    counter.reset()
    np.testing.assert_array_equal(extractor.transform(images), first)
    assert counter.total == 0


def test_cache_info_and_clear(labelled, tmp_path):
    X, _ = labelled
    FeatureExtractor(**TINY, layers=["layer2", "layer3"], cache=tmp_path).fit(X).transform(X)
    info = cache_info(tmp_path)
    assert info["entries"] == 60 and len(info["configs"]) == 1
    description = info["configs"][0]["description"]
    assert description["backbone"] == "resnet18" and description["preprocessing"]["crop_size"] == 32
    # Each entry holds 3 summaries per channel (mean, max, GeM) of float32 plus a header.
    assert info["bytes"] > 30 * 3 * (128 + 256) * 4

    half = info["bytes"] // 2
    freed = clear_cache(tmp_path, max_bytes=half)
    assert cache_info(tmp_path)["bytes"] <= half and freed >= info["bytes"] - half
    assert clear_cache(tmp_path) > 0
    assert cache_info(tmp_path)["entries"] == 0
    assert not (tmp_path / "skt-features").exists()  # clearing everything removes the folder
    assert clear_cache(tmp_path) == 0


# ----------------------------------------------------------- fingerprints --

def test_fingerprint_follows_content_not_name(image_files, tmp_path, images):
    copy = tmp_path / "copy.png"
    copy.write_bytes(open(image_files[0], "rb").read())
    assert fingerprint(image_files[0]) == fingerprint(str(copy))
    assert fingerprint(image_files[0]) != fingerprint(image_files[1])
    changed = images[0].copy()
    changed[0, 0, 0] ^= 1
    assert fingerprint(images[0]) != fingerprint(changed)
    assert fingerprint(images[0]) == fingerprint(images[0].copy())


def test_fingerprint_of_a_rewritten_file_changes(image_files, images):
    before = fingerprint(image_files[0])
    Image.fromarray(images[1]).save(image_files[0])  # same name, new content
    assert fingerprint(image_files[0]) == fingerprint(image_files[1]) != before


def test_fingerprint_of_pil_images_and_tensors(images):
    pil = Image.fromarray(images[0])
    assert fingerprint(pil) == fingerprint(Image.fromarray(images[0].copy()))
    assert fingerprint(pil) != fingerprint(pil.convert("L"))
    tensor = torch.from_numpy(images[0])
    # The same bytes as a (C, H, W) tensor and an (H, W, C) array are different images.
    assert fingerprint(tensor) != fingerprint(images[0])
    assert fingerprint(tensor) == fingerprint(tensor.clone())


def test_fingerprint_module_follows_weights_not_identity():
    def net(seed):
        torch.manual_seed(seed)
        return torch.nn.Linear(3, 2)

    assert fingerprint_module(net(0)) == fingerprint_module(net(0))
    assert fingerprint_module(net(0)) != fingerprint_module(net(1))
    half = net(0).to(torch.bfloat16)  # no numpy dtype: hashed from its bytes
    assert fingerprint_module(half) != fingerprint_module(net(0))


# ------------------------------------------------------------- the protocol --

def test_serve_reads_hits_and_computes_only_the_missing(tmp_path):
    cache = FeatureCache(tmp_path)
    description = {"what": "test"}
    layers = [("a", "stats"), ("b", "vector")]
    keys = [f"{i:02d}" * 16 for i in range(5)]
    asked = []

    def compute(indices):
        asked.append(list(indices))
        for start in range(0, len(indices), 2):
            rows = indices[start:start + 2]
            yield rows, [np.array([[i, i] for i in rows], np.float32),
                         np.array([[10 * i] for i in rows], np.float32)]

    def collect():
        got = {}

        def emit(rows, summaries):
            for j, i in enumerate(rows):
                got[i] = [s[j].tolist() for s in summaries]
        return got, emit

    got, emit = collect()
    cache.serve(description, layers, keys[:3], compute, emit)
    assert asked == [[0, 1, 2]]
    assert got == {i: [[i, i], [10 * i]] for i in range(3)}
    forget_memory()  # read from disk, as another process would
    got, emit = collect()
    cache.serve(description, layers, keys, compute, emit)
    assert asked[-1] == [3, 4]
    assert got == {i: [[i, i], [10 * i]] for i in range(5)}
    got, emit = collect()
    cache.serve({"what": "another"}, layers, keys[:1], compute, emit)
    assert asked[-1] == [0]  # another configuration shares nothing



def test_config_key_rewrites_a_damaged_or_foreign_description(tmp_path):
    cache = FeatureCache(tmp_path)
    description = {"backbone": "resnet18", "size": (32, 32)}
    key = cache.config_key(description)
    path = cache.root / key / "config.json"
    assert json.loads(path.read_text()) == {"backbone": "resnet18", "size": [32, 32]}
    good = path.read_text()
    for damage in ('{"backbone": "resn', '{"backbone": "vit"}', "[1, 2]", "\xff\xfe"):
        path.write_text(damage, encoding="latin-1")
        with pytest.warns(RuntimeWarning) as caught:
            assert cache.config_key(description) == key
        assert [str(w.message) for w in caught] == [
            f"Rewriting {path}: it was unreadable or described another configuration."]
        assert path.read_text() == good
    before = path.stat().st_mtime_ns
    cache.config_key(description)  # a sound description is left alone
    assert path.stat().st_mtime_ns == before


# ---------------------------------------------------------------- sealing --

def test_sealed_files_know_their_place_in_the_cache(tmp_path):
    place = tmp_path / "skt-features" / f"v{FORMAT_VERSION}" / "config" / "layer" / "ab" / "abcd"
    data = seal(place, b"payload")
    assert len(data) == len(b"payload") + 16
    assert unseal(place, data) == b"payload"
    # The same place in a cache folder moved elsewhere, even one inside a folder of that name.
    moved = (tmp_path / "skt-features" / "backup" / "skt-features" / f"v{FORMAT_VERSION}"
             / "config" / "layer")
    assert unseal(moved / "ab" / "abcd", data) == b"payload"
    for wrong in (place.with_name("abce"), place.parent.parent / "other" / "ab" / "abcd"):
        assert unseal(wrong, data) is None
    assert unseal(place, data[:-1]) is None and unseal(place, data[:10]) is None
    assert unseal(place, b"q" + data[1:]) is None and unseal(place, b"") is None


def test_cache_format_is_versioned(tmp_path):
    assert FORMAT_VERSION == 3
    assert FeatureCache(tmp_path).root == tmp_path / "skt-features" / "v3"


# ------------------------------------------------------------------ paths --

def test_tilde_means_the_home_folder(images, tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    FeatureExtractor(**TINY, cache="~/.cache/skt-features").fit(images).transform(images)
    assert list(work.iterdir()) == []  # no folder named "~" here
    folder = home / ".cache" / "skt-features"
    assert cache_info(folder)["entries"] == 8
    assert cache_info("~/.cache/skt-features")["path"] == str(folder)
    assert cache_info(Path("~/.cache/skt-features"))["entries"] == 8
    assert open_cache("~/elsewhere").location == home / "elsewhere"
    assert open_cache(Path("~", "elsewhere")).location == home / "elsewhere"
    assert clear_cache(Path("~/.cache/skt-features")) > 0
    assert cache_info(folder)["entries"] == 0


def test_default_cache_dir_expands_tilde_in_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SKT_CACHE_DIR", "~/skt-cache")
    assert default_cache_dir() == tmp_path / "skt-cache"
    monkeypatch.setenv("SKT_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert default_cache_dir() == tmp_path / "xdg" / "skt"
    monkeypatch.delenv("SKT_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == tmp_path / ".cache" / "skt"
    assert (tmp_path / ".cache" / "skt").is_dir()


def test_cache_info_and_clear_need_an_existing_folder(tmp_path):
    missing = tmp_path / "missing"
    message = f"'{missing}': no such folder. Pass the folder given as cache=."
    with pytest.raises(FileNotFoundError) as caught:
        cache_info(missing)
    assert str(caught.value) == message
    with pytest.raises(FileNotFoundError) as caught:
        clear_cache(missing)
    assert str(caught.value) == message
    assert not missing.exists()  # asking does not create it
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(FileNotFoundError, match="'.*file': a file, not a folder"):
        cache_info(a_file)
    (tmp_path / "other").mkdir()  # a folder holding no skt cache
    assert cache_info(tmp_path) == {"path": str(tmp_path), "entries": 0, "graphs": 0,
                                    "bytes": 0, "configs": []}
    assert clear_cache(tmp_path) == 0 and (tmp_path / "other").is_dir()


def test_cache_info_reports_an_unreadable_description(images, tmp_path):
    FeatureExtractor(**TINY, cache=tmp_path).fit(images).transform(images)
    (config,) = (tmp_path / "skt-features" / f"v{FORMAT_VERSION}").iterdir()
    path = config / "config.json"
    path.write_text('{"backbone": "res')
    with pytest.warns(RuntimeWarning) as caught:
        info = cache_info(tmp_path)
    error = (f"unreadable config.json at {path}: Unterminated string starting at: "
             "line 1 column 14 (char 13)")
    assert [str(w.message) for w in caught] == [
        f"{error}; it is rewritten the next time this configuration is used."]
    assert info["entries"] == 8 and info["configs"][0]["description"] == {"error": error}


def test_check_cache_writable(tmp_path):
    check_cache_writable(None)
    check_cache_writable(joblib.Memory(None, verbose=0))
    check_cache_writable(tmp_path / "new")
    created = tmp_path / "new" / "skt-features" / f"v{FORMAT_VERSION}"
    assert created.is_dir() and list(created.iterdir()) == []  # created, and left empty
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError) as caught:
        check_cache_writable(blocker)
    assert str(caught.value) == (
        f"cache='{blocker}' cannot be written (Not a directory). Fix the folder's permissions, "
        "choose another folder, or pass cache=None to extract without a cache.")


def test_a_lock_file_that_cannot_be_opened_is_no_obstacle(tmp_path):
    cache = FeatureCache(tmp_path)
    config = cache.config_key({"what": "test"})
    (cache.root / config / ".lock").mkdir()  # cannot be opened for writing
    with cache.lock(config):
        pass
    descriptor = skt.cache._take_lock(cache.root / "new" / ".lock")  # folder created
    assert descriptor is not None and (cache.root / "new" / ".lock").is_file()
    os.close(descriptor)


def test_palette_images_with_other_colours_have_other_fingerprints():
    from PIL import Image

    indices = Image.new("P", (4, 4))
    other = indices.copy()
    indices.putpalette([255, 0, 0] * 256)
    other.putpalette([0, 0, 255] * 256)
    assert indices.tobytes() == other.tobytes()  # the same indices ...
    assert fingerprint(indices) != fingerprint(other)  # ... into other colours
