"""skt.distributed and the Dask routes: extraction by partitions, searches, ``skt extract --dask``.

One ``LocalCluster`` of two single-threaded worker processes serves the
whole module (starting one takes seconds); tiny images and a random-init
ResNet-18 keep each task short.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import joblib
import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline

import skt.distributed as sd
from skt import FeatureExtractor
from skt.cli import main, read_jsonl
from tests.conftest import TINY, require

distributed = require("distributed", "pip install 'skt[dask]'")
dask = require("dask", "pip install 'skt[dask]'")

N_IMAGES = 20
PARTITION = 6  # 4 partitions: 6, 6, 6 and 2 images


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    # Not the default client: every call here names it (``sd.extract(client=...)``),
    # as a program with several clients must.
    with cluster, distributed.Client(cluster, set_as_default=False) as client:
        yield client


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i in range(N_IMAGES):
        path = folder / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _extractor(**params) -> FeatureExtractor:
    return FeatureExtractor(**{**TINY, "layers": "layer3", "batch_size": 4, **params})


def _extract(files, extractor, out, client) -> dict:
    return sd.extract(files, extractor, out, client=client, partition_size=PARTITION)


def _reference(files) -> np.ndarray:
    return _extractor().fit(files).transform(files)


def _same_rows(actual, expected) -> None:
    # Partitions batch the images differently from one transform call; a network's
    # output can depend on its batch at the last bits, not more.
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_without_a_client_the_partitions_run_here(files, tmp_path):
    assert sd._client(None) is None
    manifest = sd.extract(files, _extractor(), tmp_path / "out", partition_size=8)
    _same_rows(sd.load_features(tmp_path / "out"), _reference(files))
    assert manifest["computed"] == ["part-00000", "part-00001", "part-00002"]


def test_extract_on_the_cluster_equals_transform_row_for_row(client, files, tmp_path):
    out = tmp_path / "out"
    manifest = _extract(files, _extractor(), out, client)

    features = sd.load_features(out)
    assert isinstance(features, np.memmap) and features.dtype == np.float32
    _same_rows(features, _reference(files))
    assert [(p["start"], p["stop"]) for p in manifest["partitions"]] == [
        (0, 6), (6, 12), (12, 18), (18, 20)]
    assert manifest["computed"] == [f"part-0000{i}" for i in range(4)]
    assert manifest["n_images"] == N_IMAGES and manifest["n_features"] == 256
    assert manifest["feature_names"][:2] == ["layer3_avg_0", "layer3_avg_1"]
    assert read_jsonl(out / "paths.jsonl") == files
    assert json.loads((out / "manifest.json").read_text())["job"] == manifest["job"]
    # The extractor travelled without its weights; workers built the network, once each.
    assert len(pickle.dumps(_extractor().fit(files[:1]))) < 100_000
    built = client.run(lambda: len(__import__("skt.extractor").extractor._BACKBONES))
    assert sorted(built.values()) in ([0, 1], [1, 1])
    assert isinstance(sd.load_features(out, mmap_mode=None), np.ndarray)


def test_the_current_client_is_used_when_none_is_given(client, files, tmp_path):
    with client.as_current():
        manifest = sd.extract(files, _extractor(), tmp_path, partition_size=10)
    assert manifest["computed"] == ["part-00000", "part-00001"]
    _same_rows(sd.load_features(tmp_path), _reference(files))
    assert sd._client(None) is None  # outside the block, the partitions would run here


def test_a_second_run_computes_only_missing_damaged_or_changed_partitions(client, files,
                                                                           tmp_path):
    out = tmp_path / "out"
    extractor = _extractor()
    _extract(files, extractor, out, client)
    assert _extract(files, extractor, out, client)["computed"] == []

    (out / "part-00000.npy").unlink()  # missing
    with open(out / "part-00002.npy", "r+b") as handle:  # damaged
        handle.seek(200)
        handle.write(b"\xff\xff")
    Image.fromarray(np.zeros((36, 40, 3), np.uint8)).save(files[19])  # an image changed
    (out / "features.npy").unlink()
    manifest = _extract(files, extractor, out, client)

    assert manifest["computed"] == ["part-00000", "part-00002", "part-00003"]
    _same_rows(sd.load_features(out), _reference(files))


def test_other_settings_start_over(client, files, tmp_path):
    out = tmp_path / "out"
    _extract(files, _extractor(), out, client)
    manifest = _extract(files, _extractor(pooling="max"), out, client)
    assert len(manifest["computed"]) == 4
    expected = _extractor(pooling="max").fit(files).transform(files)
    _same_rows(sd.load_features(out), expected)


def _die_on(marker: str) -> None:
    """On a worker: the next partition that holds ``marker``'s image kills the process,
    once (the marker file is removed first)."""
    from skt.extractor import FeatureExtractor

    original = FeatureExtractor.transform_into

    def transform_into(self, X, out):
        if os.path.exists(marker) and Path(marker).read_text() in X:
            os.unlink(marker)
            os._exit(1)  # as SIGKILL or the OOM killer would: no cleanup, mid-partition
        return original(self, X, out)

    FeatureExtractor.transform_into = transform_into


def test_a_worker_killed_mid_partition_loses_only_that_partition(client, files, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "die"
    marker.write_text(files[7])  # in part-00001
    client.run(_die_on, str(marker))
    extractor = _extractor()
    scheduler = client.cluster.scheduler
    allowed, scheduler.allowed_failures = scheduler.allowed_failures, 0  # no retry elsewhere
    try:
        with pytest.raises(RuntimeError, match=r"(?s)(\d) of 4 partitions failed; the first, "
                                               r"part-0000\d \(images \d+ to \d+: .*\.png.*"
                                               r"KilledWorker.*The (\d) complete partitions "
                                               r"are kept") as caught:
            _extract(files, extractor, out, client)
    finally:
        scheduler.allowed_failures = allowed
    # The partitions the dead worker held (the one it ran, and any queued on it) failed.
    failed, kept = (int(n) for n in re.search(r"(\d) of 4.*The (\d) complete",
                                                str(caught.value), re.S).groups())
    complete = sorted(p.stem for p in out.glob("part-*.json"))
    assert failed + kept == 4 and len(complete) == kept and "part-00001" not in complete
    assert not (out / "features.npy").exists()

    client.wait_for_workers(2, timeout=60)  # the nanny restarts the dead worker
    manifest = _extract(files, extractor, out, client)
    assert manifest["computed"] == sorted({f"part-0000{i}" for i in range(4)} - set(complete))
    rows = [row for p in manifest["partitions"] for row in range(p["start"], p["stop"])]
    assert rows == list(range(N_IMAGES))  # nothing lost, nothing twice
    _same_rows(sd.load_features(out), _reference(files))


def test_an_unreadable_image_fails_its_partition_naming_the_file(client, files, tmp_path):
    out = tmp_path / "out"
    Path(files[13]).write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"1 of 4 partitions failed; the first, part-00002 "
                                         r"\(images 12 to 17.*13\.png"):
        _extract(files, _extractor(), out, client)

    manifest = _extract(files, _extractor(on_error="skip"), out, client)
    features = sd.load_features(out)
    assert np.isnan(features[13]).all() and not np.isnan(np.delete(features, 13, 0)).any()
    [(row, path, message)] = manifest["skipped"]
    assert (row, path) == (13, files[13]) and "13.png" in message


def test_bad_arguments_are_refused(files, tmp_path):
    with pytest.raises(TypeError, match=r"paths\[1\] is a ndarray"):
        sd.extract([files[0], np.zeros((8, 8, 3))], _extractor(), tmp_path)
    with pytest.raises(ValueError, match="partition_size must be a positive int"):
        sd.extract(files, _extractor(), tmp_path, partition_size=0)
    with pytest.raises(TypeError, match="must be a skt.FeatureExtractor"):
        sd.extract(files, LogisticRegression(), tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no complete skt.distributed.extract"):
        sd.load_features(tmp_path)


def _count_network_images(log: str) -> None:
    """On a worker: append the number of images each network run computes to ``log``."""
    from skt.extract import FeatureRuntime

    original = FeatureRuntime.summaries

    def summaries(self, images, indices, *args, **kwargs):
        for rows, values in original(self, images, indices, *args, **kwargs):
            with open(log, "a") as handle:
                handle.write(f"{len(rows)}\n")
            yield rows, values

    FeatureRuntime.summaries = summaries


def _search(X, y, cache, backend: str, **options) -> GridSearchCV:
    pipe = make_pipeline(_extractor(cache=cache), LogisticRegression(max_iter=500))
    grid = {"featureextractor__pooling": ["avg", "max"],
            "logisticregression__C": [0.01, 1.0, 100.0]}
    with joblib.parallel_backend(backend, n_jobs=2, **options):
        return GridSearchCV(pipe, grid, cv=3).fit(X, y)


def test_grid_search_on_the_cluster_matches_loky_and_runs_each_image_once(
        client, files, tmp_path):
    X = np.asarray(files)
    y = np.array([Image.open(f).convert("L").getpixel((0, 0)) > 127 for f in files])
    log = tmp_path / "network.log"
    client.run(_count_network_images, str(log))

    on_dask = _search(X, y, tmp_path / "dask-cache", "dask", client=client)
    local = _search(X, y, tmp_path / "loky-cache", "loky")

    assert on_dask.best_params_ == local.best_params_
    np.testing.assert_allclose(on_dask.cv_results_["mean_test_score"],
                               local.cv_results_["mean_test_score"])
    # 2 poolings x 3 values of C x 3 folds, plus the refit, share one configuration
    # of the cache (every pooling but "flatten" is finished from the same summaries):
    # across both workers, each image went through the network once.
    computed = [int(line) for line in log.read_text().split()]
    assert sum(computed) == N_IMAGES


def test_skt_extract_dask_writes_what_the_single_process_command_writes(
        client, files, tmp_path, capsys):
    here, there = tmp_path / "here.npy", tmp_path / "there.npy"
    options = ["--backbone", "resnet18", "--weights", "none", "--random-state", "0",
               "--image-size", "32", "--layers", "layer3", "--engine", "torch"]
    assert main(["extract", *files, "-o", str(here), *options]) == 0
    assert main(["extract", *files, "-o", str(there), *options,
                 "--dask", client.scheduler.address, "--partition-size", "7"]) == 0
    assert f"Dask cluster at {client.scheduler.address}" in capsys.readouterr().err
    _same_rows(np.load(there), np.load(here))
    assert read_jsonl(tmp_path / "there.paths.jsonl") == read_jsonl(tmp_path / "here.paths.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_skt_extract_dask_says_what_to_do_when_no_scheduler_answers(files, tmp_path, capsys):
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        status = main(["extract", files[0], "-o", str(tmp_path / "f.npy"),
                       "--dask", "tcp://127.0.0.1:1"])
    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("skt: error: --dask tcp://127.0.0.1:1: cannot reach a Dask "
                          "scheduler there") and "dask worker tcp://127.0.0.1:1" in err
