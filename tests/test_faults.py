"""Faults, injected: killed runs, damaged and misplaced files, unwritable folders, failed fits.

- ``skt extract`` killed with SIGKILL mid-run, then run again, gives the bytes
  of an uninterrupted run. The killed run is a child process (``python -m
  skt``); the resumed run and the reference go through :func:`skt.cli.main`
  in this process, all on one torch thread, so features compare byte for byte.
- The feature cache: swapped, truncated and corrupted entries, ONNX graphs
  and ``config.json`` files are reported and rebuilt. Read-only folders are
  real where possible: file permissions for an ordinary user; for root, whom
  permissions do not stop, a tmpfs remounted read-only. Each read-only test
  also runs on a simulated read-only filesystem (every call that would write
  under the folder fails with EROFS), so the same code runs where neither is
  possible. A full disk is a small tmpfs when mounting is allowed, and a
  writer failing with ENOSPC otherwise.
- ``FineTuneClassifier.fit``: damaged checkpoints, unreadable images,
  interrupts and an unwritable cache folder. A fit that fails leaves the
  classifier as it was, and nothing behind: no decoding thread, no file of
  the frozen stages' outputs, grad mode on.
"""

import builtins
import errno
import io
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.exceptions import NotFittedError

import skt.cache
import skt.extract._engines
import skt.extractor
from skt import FeatureExtractor, cache_info, clear_cache
from skt.cache import (
    FORMAT_VERSION,
    FeatureCache,
    check_cache_writable,
    forget_memory,
    seal,
    unseal,
)
from skt.cli import kill_and_resume, main, read_jsonl
from skt.extract import TorchEngine
from skt.training import Callback, Trunk, _trunk

from .conftest import TINY, require
from .test_finetune import CountEpochs, make_clf, make_images, weights_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------- skt extract killed --

N_IMAGES = 96
BATCH = 8
ARGS = ["--backbone", "resnet18", "--weights", "none", "--random-state", "0",
        "--image-size", "32", "--batch-size", str(BATCH), "--engine", "torch"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """96 small PNGs in two class folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        label = root / ("even", "odd")[i % 2]
        label.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(label / f"{i:03d}.png")
    return root


def _contents(folder):
    """Every file in ``folder`` (hidden ones included): name -> bytes."""
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
@pytest.mark.parametrize("suffix", [".npy", ".npz"])
@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
def test_killed_extract_resumes_to_the_same_bytes(suffix, cached, image_folder, tmp_path):
    def argv(name):
        cache = ["--cache", str(tmp_path / f"cache-{name}")] if cached else []
        return ["extract", str(image_folder), "-o", str(tmp_path / name / f"f{suffix}"), *ARGS,
                *cache]

    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()
    (killed_dir / f"f{suffix}").write_bytes(b"an earlier run's output")
    if suffix == ".npy":
        (killed_dir / "f.paths.txt").write_text("written by an earlier version\n")
    earlier = _contents(killed_dir)

    def killed_state(rows):
        # the earlier output untouched; the unfinished run in hidden files only
        staged = _contents(killed_dir)
        staging = {f".f{suffix}.partial", f".f{suffix}.progress"}
        assert staging <= set(staged) <= {*earlier, *staging, f".f{suffix}.progress.partial"}
        assert {name: staged[name] for name in earlier} == earlier

    rows, status, err = kill_and_resume(argv("killed"), env=ONE_THREAD, inspect=killed_state)
    assert status == 0, err
    assert 0 < rows < N_IMAGES and rows % BATCH == 0
    assert f"skt: resuming {killed_dir / f'f{suffix}'} from image {rows} of {N_IMAGES}\n" in err

    assert main(argv("reference")) == 0
    killed, reference = _contents(killed_dir), _contents(tmp_path / "reference")
    assert sorted(killed) == sorted(reference)
    assert [name for name in reference if killed[name] != reference[name]] == []
    if suffix == ".npy":
        assert sorted(reference) == ["f.labels.jsonl", "f.npy", "f.paths.jsonl"]
        assert len(read_jsonl(killed_dir / "f.paths.jsonl")) == N_IMAGES
        features = np.load(killed_dir / "f.npy")
    else:
        with np.load(killed_dir / "f.npz") as saved:
            features = saved["features"]
    assert features.shape == (N_IMAGES, 512) and np.all(features.any(axis=1))  # no zero row


# ------------------------------------------------------------ the cache --

@pytest.fixture(autouse=True)
def _as_in_a_new_process(monkeypatch):
    """No folder given up on, no network or entry remembered from an earlier test."""
    monkeypatch.setattr(skt.cache, "_UNWRITABLE", set())
    skt.extractor._RUNTIMES.clear()
    forget_memory()


@pytest.fixture
def counter(monkeypatch):
    """How many images went through the torch engine."""
    seen = {"images": 0}
    original = TorchEngine.__call__

    def counting(engine, batch):
        seen["images"] += len(batch)
        return original(engine, batch)

    monkeypatch.setattr(TorchEngine, "__call__", counting)
    return seen


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / "skt-features").rglob("*")
                  if p.is_file() and not p.name.startswith(".")
                  and p.name != "config.json" and p.suffix != ".onnx")


def _recorded(action):
    """Run ``action()``; return its value and the messages of every warning it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = action()
    return value, [str(w.message) for w in caught]


def _discarded(path) -> str:
    return (f"Discarding damaged feature-cache entry {path} (truncated, corrupt or moved from "
            "another entry's place); it will be recomputed.")


def _cannot_write(folder, reason: str) -> str:
    return (f"Cannot write to the cache folder {folder} ({reason}); carrying on without storing "
            "features or graphs there in this process. Free disk space or fix the folder's "
            "permissions to cache again.")


def _uncached(images, **params):
    return FeatureExtractor(**{**TINY, **params}).fit(images).transform(images)


# ---------------------------------------------------------- damaged entries --

def test_swapped_entries_are_discarded_and_recomputed(images, counter, tmp_path):
    extractor = FeatureExtractor(**TINY, cache=tmp_path).fit(images)
    clean = extractor.transform(images)
    distances = np.abs(clean[:, None] - clean[None]).max(axis=2)
    assert distances[~np.eye(8, dtype=bool)].min() > 1e-3  # a swap would show
    entries = _entries(tmp_path)
    a, b = entries[2], entries[5]
    parked = a.with_name("parked")
    a.rename(parked)
    b.rename(a)
    parked.rename(b)
    forget_memory()
    counter["images"] = 0
    again, messages = _recorded(lambda: extractor.transform(images))
    assert sorted(messages) == sorted([_discarded(a), _discarded(b)])
    assert counter["images"] == 2
    # Recomputed in a batch of 2, not 8: the last bits may differ.
    np.testing.assert_allclose(again, clean, rtol=1e-5, atol=1e-5)
    forget_memory()
    counter["images"] = 0
    third, messages = _recorded(lambda: extractor.transform(images))
    assert messages == [] and counter["images"] == 0  # rewritten sound
    np.testing.assert_array_equal(third, again)


@pytest.mark.parametrize("damage", [
    "copied from another entry", "one byte flipped", "truncated to the checksum", "emptied",
    "grown",
])
def test_a_damaged_entry_is_discarded_and_recomputed(images, counter, tmp_path, damage):
    extractor = FeatureExtractor(**TINY, cache=tmp_path).fit(images)
    clean = extractor.transform(images)
    entries = _entries(tmp_path)
    victim, data = entries[4], entries[4].read_bytes()
    if damage == "copied from another entry":
        damaged = entries[1].read_bytes()
    elif damage == "one byte flipped":
        middle = len(data) // 2
        damaged = data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:]
    elif damage == "truncated to the checksum":
        damaged = data[-16:]
    elif damage == "emptied":
        damaged = b""
    else:
        damaged = data + b"\0" * 64
    victim.write_bytes(damaged)
    forget_memory()
    counter["images"] = 0
    again, messages = _recorded(lambda: extractor.transform(images))
    assert messages == [_discarded(victim)] and counter["images"] == 1
    np.testing.assert_allclose(again, clean, rtol=1e-5, atol=1e-5)
    assert unseal(victim, victim.read_bytes()) is not None


def test_entries_written_before_the_format_carried_their_place_miss(images, counter, tmp_path):
    FeatureExtractor(**TINY, cache=tmp_path).fit(images).transform(images)
    old = tmp_path / "skt-features" / "v1"
    (tmp_path / "skt-features" / f"v{FORMAT_VERSION}").rename(old)
    forget_memory()
    counter["images"] = 0
    _, messages = _recorded(lambda: FeatureExtractor(**TINY, cache=tmp_path).fit(images)
                            .transform(images))
    assert messages == [] and counter["images"] == 8  # another folder: a plain miss


# --------------------------------------------------------------- config.json --

@pytest.mark.parametrize("content", ['{"backbone": "resn', '{"backbone": "vgg11"}', "[]"])
def test_a_damaged_config_json_is_reported_then_rewritten(images, counter, tmp_path, content):
    extractor = FeatureExtractor(**TINY, cache=tmp_path).fit(images)
    clean = extractor.transform(images)
    (config,) = (tmp_path / "skt-features" / f"v{FORMAT_VERSION}").iterdir()
    path = config / "config.json"
    sound = path.read_text()
    path.write_text(content)
    info, messages = _recorded(lambda: cache_info(tmp_path))
    if content == '{"backbone": "vgg11"}':  # readable: reported as it is
        assert messages == [] and info["configs"][0]["description"] == {"backbone": "vgg11"}
    else:
        error = info["configs"][0]["description"]["error"]
        assert error.startswith(f"unreadable config.json at {path}: ")
        assert messages == [f"{error}; it is rewritten the next time this configuration is used."]
    assert info["entries"] == 8
    forget_memory()
    counter["images"] = 0
    again, messages = _recorded(lambda: FeatureExtractor(**TINY, cache=tmp_path).fit(images)
                                .transform(images))
    assert messages == [f"Rewriting {path}: it was unreadable or described another "
                        "configuration."]
    assert path.read_text() == sound
    assert counter["images"] == 0  # the entries were never in doubt
    np.testing.assert_array_equal(again, clean)
    info, messages = _recorded(lambda: cache_info(tmp_path))
    assert messages == [] and info["configs"][0]["description"]["backbone"] == "resnet18"


# --------------------------------------------------------------- ONNX graphs --

def _tiny_network(seed: int) -> torch.nn.Module:
    """Exports to ONNX in half the time of a ResNet-18."""
    generator = torch.Generator().manual_seed(seed)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                  torch.nn.Linear(4, 2))
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return network


ONNX_TINY = {"backbone": _tiny_network(0), "image_size": 16, "engine": "onnx", "layers": "1"}


@pytest.fixture
def onnx_installed():
    require("onnxruntime", "pip install 'skt[onnx]'")


def _no_export(model, size):
    raise AssertionError("exported again")


def _damage_graph(graph: Path, damage: str, images, folder: Path) -> None:
    if damage == "truncated":
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    elif damage == "not an ONNX graph":
        graph.write_bytes(seal(graph, b"not an ONNX graph"))  # the checksum holds
    else:  # a sound graph of another network, sealed for this place
        FeatureExtractor(**{**ONNX_TINY, "backbone": _tiny_network(1)}, cache=folder).fit(images)
        (other,) = (g for g in folder.rglob("graph-*.onnx") if g != graph)
        graph.write_bytes(seal(graph, unseal(other, other.read_bytes())))


@pytest.mark.parametrize("engine, where, damage, reason", [
    ("onnx", "cache=", "truncated", "truncated, corrupt or moved from another graph's place"),
    ("auto", "SKT_CACHE_DIR", "truncated",
     "truncated, corrupt or moved from another graph's place"),
    ("onnx", "cache=", "not an ONNX graph", "[ONNXRuntimeError]"),
    ("onnx", "cache=", "another network's graph",
     "the exported graph's outputs differ from the eager model's"),
])
def test_a_damaged_graph_is_exported_again_and_rewritten(onnx_installed, images, tmp_path,
                                                         monkeypatch, engine, where, damage,
                                                         reason):
    folder = tmp_path / "cache"
    params = {**ONNX_TINY, "engine": engine}
    if where == "cache=":
        params["cache"] = folder
    else:
        monkeypatch.setenv("SKT_CACHE_DIR", str(folder))
    first = FeatureExtractor(**params).fit(images)
    features = first.transform(images)
    (graph,) = folder.rglob("graph-*.onnx")
    _damage_graph(graph, damage, images, folder)
    skt.extractor._RUNTIMES.clear()
    again, messages = _recorded(lambda: FeatureExtractor(**params).fit(images))
    assert len(messages) == 1
    assert messages[0].startswith(f"Discarding the exported ONNX graph {graph} ({reason}")
    assert messages[0].endswith("); exporting it again.")
    assert again.engine_ == "onnx"
    assert unseal(graph, graph.read_bytes()) is not None  # sound again
    np.testing.assert_allclose(again.transform(images), features, rtol=1e-6, atol=1e-6)
    skt.extractor._RUNTIMES.clear()  # and the next process loads it
    monkeypatch.setattr(skt.extract._engines, "_export_onnx", _no_export)
    third, messages = _recorded(lambda: FeatureExtractor(**params).fit(images))
    assert messages == [] and third.engine_ == "onnx"


# ------------------------------------------------------- read-only folders --

def _run(*command: str) -> bool:
    try:
        return subprocess.run(command, capture_output=True).returncode == 0
    except OSError:  # no such program
        return False


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))


def _simulate_read_only(monkeypatch, folder: Path) -> None:
    """From now on, every call that would write under ``folder`` fails with EROFS."""
    root = os.path.abspath(folder)
    real_open, real_os_open = io.open, os.open

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        path = os.path.abspath(os.fsdecode(path))
        return path == root or path.startswith(root + os.sep)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def open_(file, mode="r", *args, **kwargs):
        if inside(file) and set(mode) & set("wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def refusing(function):
        def guarded(*args, **kwargs):
            for path in args:
                if not isinstance(path, int) and inside(path):
                    refuse(path)
            return function(*args, **kwargs)
        return guarded

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    for name in ("mkdir", "rmdir", "unlink", "remove", "rename", "replace"):
        monkeypatch.setattr(os, name, refusing(getattr(os, name)))


class Storage:
    """A writable folder until :meth:`freeze` makes it read-only.

    ``how`` is "permissions", "tmpfs" or "simulated"; ``reason`` is the
    ``strerror`` of a write that then fails.
    """

    def __init__(self, path: Path, how: str, monkeypatch) -> None:
        self.path, self.how, self._monkeypatch = path, how, monkeypatch
        self.reason = "Permission denied" if how == "permissions" else "Read-only file system"

    def freeze(self) -> None:
        if self.how == "permissions":
            self._chmod(0o555, 0o444)
        elif self.how == "tmpfs":
            assert _run("mount", "-o", "remount,ro", str(self.path))
        else:
            _simulate_read_only(self._monkeypatch, self.path)

    def close(self) -> None:
        if self.how == "permissions":
            self._chmod(0o755, 0o644)
        elif self.how == "tmpfs":
            _run("umount", "-l", str(self.path))

    def _chmod(self, folders: int, files: int) -> None:
        for parent, _, files_here in os.walk(self.path):
            os.chmod(parent, folders)
            for name in files_here:
                os.chmod(os.path.join(parent, name), files)


@pytest.fixture(params=["real", "simulated"])
def storage(request, tmp_path, monkeypatch):
    path = tmp_path / "storage"
    if request.param == "simulated":
        how = "simulated"
        path.mkdir()
    elif hasattr(os, "geteuid") and os.geteuid() != 0:
        how = "permissions"
        path.mkdir()
    elif _mount_tmpfs(path, "32m"):
        how = "tmpfs"
    else:
        pytest.skip("running as root, whom file permissions do not stop, without the right "
                    "to mount a tmpfs to remount read-only; the simulated run covers this")
    store = Storage(path, how, monkeypatch)
    yield store
    store.close()


def test_a_read_only_implicit_folder_degrades_to_no_cache(onnx_installed, storage, images,
                                                          monkeypatch):
    monkeypatch.setenv("SKT_CACHE_DIR", str(storage.path))
    storage.freeze()

    def two_fits():
        first = FeatureExtractor(**ONNX_TINY).fit(images)
        second = FeatureExtractor(**{**ONNX_TINY, "layers": "2"}).fit(images)
        return first, second

    (first, second), messages = _recorded(two_fits)
    assert messages == [
        f"skt's cache folder {storage.path} is not writable ({storage.reason}); carrying on "
        "without it: exported ONNX graphs stay in memory, and fine-tuning's temporary files "
        "go to the system's temporary folder. Set SKT_CACHE_DIR to a writable folder to keep "
        "them."]
    assert first.engine_ == second.engine_ == "onnx"
    assert list(storage.path.iterdir()) == []
    eager = FeatureExtractor(**{**ONNX_TINY, "engine": "torch"}).fit(images).transform(images)
    np.testing.assert_allclose(first.transform(images), eager, rtol=1e-3, atol=1e-4)


def test_an_explicit_read_only_folder_is_an_error_before_any_work(storage):
    storage.freeze()
    with pytest.raises(OSError) as caught:
        check_cache_writable(storage.path)
    assert str(caught.value) == (
        f"cache={str(storage.path)!r} cannot be written ({storage.reason}). Fix the folder's "
        "permissions, choose another folder, or pass cache=None to extract without a cache.")


def test_a_folder_turning_read_only_mid_run_warns_once(storage, images, counter):
    extractor = FeatureExtractor(**TINY, cache=storage.path).fit(images)
    extractor.transform(images[:4])
    storage.freeze()
    forget_memory()
    counter["images"] = 0

    def two_transforms():
        return extractor.transform(images), extractor.transform(images[4:])

    (features, again), messages = _recorded(two_transforms)
    assert messages == [_cannot_write(storage.path, storage.reason)]
    assert counter["images"] == 4  # 4 read from disk, 4 computed and kept in memory only
    np.testing.assert_allclose(features, _uncached(images), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(again, features[4:])
    assert cache_info(storage.path)["entries"] == 4


def test_a_lock_that_cannot_be_created_is_no_obstacle(storage):
    cache = FeatureCache(storage.path)
    description = {"what": "test"}
    config = cache.config_key(description)
    storage.freeze()
    got = {}

    def compute(indices):
        yield indices, [np.array([[i, 2 * i] for i in indices], np.float32)]

    def emit(rows, summaries):
        for j, i in enumerate(rows):
            got[i] = summaries[0][j].tolist()

    keys = [f"{i:02d}" * 16 for i in range(3)]
    _, messages = _recorded(lambda: cache.serve(description, [("a", "stats")], keys, compute,
                                                emit))
    assert got == {0: [0, 0], 1: [1, 2], 2: [2, 4]}
    assert messages == [_cannot_write(storage.path, storage.reason)]
    assert not (cache.root / config / ".lock").exists()


# ----------------------------------------------------------------- full disk --

class FillingDisk:
    """Stands in for ``atomic_write``: ``room`` entries fit, then the disk is full."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.real = skt.cache.atomic_write

    def __call__(self, path, data):
        if path.name != "config.json":
            if self.room == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            self.room -= 1
        self.real(path, data)


def test_a_disk_filling_up_mid_run_warns_once(images, counter, tmp_path, monkeypatch):
    disk = FillingDisk(room=3)
    monkeypatch.setattr(skt.cache, "atomic_write", disk)
    extractor = FeatureExtractor(**TINY, cache=tmp_path).fit(images)

    def two_transforms():
        return extractor.transform(images), extractor.transform(images)

    (features, again), messages = _recorded(two_transforms)
    assert messages == [_cannot_write(tmp_path, "No space left on device")]
    assert counter["images"] == 8  # the second transform came from memory
    np.testing.assert_allclose(features, _uncached(images), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(again, features)
    assert cache_info(tmp_path)["entries"] == 3
    disk.room = 100  # space freed: clearing the cache lets this process write again
    clear_cache(tmp_path)
    _, messages = _recorded(lambda: extractor.transform(images))
    assert messages == [] and cache_info(tmp_path)["entries"] == 8


def test_a_full_implicit_folder_keeps_graphs_in_memory(onnx_installed, images, tmp_path,
                                                       monkeypatch):
    monkeypatch.setenv("SKT_CACHE_DIR", str(tmp_path))

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(skt.cache, "atomic_write", full)

    def two_fits():
        return [FeatureExtractor(**{**ONNX_TINY, "layers": layers}).fit(images)
                for layers in ("1", "2")]

    fitted, messages = _recorded(two_fits)
    assert messages == [_cannot_write(tmp_path, "No space left on device")]
    assert [extractor.engine_ for extractor in fitted] == ["onnx", "onnx"]
    assert list(tmp_path.rglob("graph-*.onnx")) == []


@pytest.fixture
def small_disk(tmp_path):
    path = tmp_path / "small-disk"
    if not _mount_tmpfs(path, "96k"):
        pytest.skip("a real full disk is a small tmpfs, and mounting one is not allowed here "
                    "(mount -t tmpfs failed); test_a_disk_filling_up_mid_run_warns_once "
                    "simulates it")
    yield path
    _run("umount", "-l", str(path))


def test_a_real_full_disk_mid_run_warns_once(small_disk, rng, counter):
    X = rng.integers(0, 256, size=(48, 32, 32, 3), dtype=np.uint8)
    extractor = FeatureExtractor(**TINY, cache=small_disk).fit(X)
    features, messages = _recorded(lambda: extractor.transform(X))
    assert messages == [_cannot_write(small_disk, "No space left on device")]
    np.testing.assert_allclose(features, _uncached(X), rtol=1e-5, atol=1e-5)
    stored = cache_info(small_disk)["entries"]
    assert 0 < stored < 48
    forget_memory()  # what reached the disk is sound: a new process reads it
    counter["images"] = 0
    again, messages = _recorded(lambda: extractor.transform(X))
    assert messages == [] and counter["images"] == 48 - stored
    np.testing.assert_allclose(again, features, rtol=1e-5, atol=1e-5)


def test_fit_refuses_a_read_only_explicit_cache(storage, images):
    storage.freeze()
    with pytest.raises(OSError) as caught:
        FeatureExtractor(**TINY, cache=storage.path).fit(images)
    assert str(caught.value) == (
        f"cache={str(storage.path)!r} cannot be written ({storage.reason}). Fix the folder's "
        "permissions, choose another folder, or pass cache=None to extract without a cache.")


def test_a_read_only_implicit_folder_is_no_concern_of_the_torch_engine(storage, images,
                                                                       monkeypatch):
    monkeypatch.setenv("SKT_CACHE_DIR", str(storage.path))
    storage.freeze()
    extractor, messages = _recorded(lambda: FeatureExtractor(**TINY).fit(images))
    assert messages == [] and extractor.engine_ == "torch"


# ------------------------------------------------------------- fine-tuning --

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
