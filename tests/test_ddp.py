"""FineTuneClassifier across processes: two gloo processes on the CPU against one process.

The two processes are started once per session (``torch.multiprocessing``,
torchrun's environment variables, so that ``fit`` initialises the process
group itself and keeps it for the next fits) and run every scenario; the
tests compare what they saved with single-process fits in this process.

Tolerance: ``batch_size`` is the global batch and the loss is scaled so that
the gradients DDP averages are those of the whole batch, so with fixed
BatchNorm statistics and no dropout the weights match one process up to
float32 reduction order (a batch's gradient summed in two halves, then
averaged by gloo). Measured on these scenarios (AdamW, two epochs, pieces
of 4 and 3 images, class weights, LwF, L2-SP, the trunk): at most 1.2e-7
absolute; the tests allow ``rtol=1e-5, atol=1e-6``. With batch statistics
the two runs differ by design (each process normalises its piece with the
piece's statistics; see the BatchNorm paragraph of FineTuneClassifier): what
must hold then is that every process ends with the same weights.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import skt
from skt.finetune import FineTuneClassifier
from skt.images import Preprocessing
from skt.train import main as train_main
from skt.training import Callback, ImageBatches, _callbacks, split_network
from skt.training._distributed import torchrun_world

SIZE = 16
WORLD = 2
N_IMAGES = 26  # batches of 7: three full ones (pieces of 4 and 3), a final one of 5 (3 and 2)
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def tiny_net() -> nn.Sequential:
    """Two conv + BatchNorm blocks and a linear classifier "8": stages "0", "1", "3", "4"."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )


def make_images(n: int = N_IMAGES):
    """Noise images, two thirds of class "b"; "a" has a bright band on the left, "b" right."""
    rng = np.random.default_rng(0)
    X = rng.integers(0, 100, (n, SIZE, SIZE, 3), dtype=np.uint8)
    y = np.array(["a" if i % 3 == 0 else "b" for i in range(n)])
    X[y == "a", :, :SIZE // 2] += 150
    X[y == "b", :, SIZE // 2:] += 150
    return X, y


class Snapshots(Callback):
    """Keeps in ``snapshots_`` a copy of the weights after each epoch (runs on every rank)."""

    def on_train_begin(self, estimator, state):
        estimator.snapshots_ = []

    def on_epoch_end(self, estimator, state):
        estimator.snapshots_.append({k: v.detach().clone()
                                     for k, v in state.model.state_dict().items()})


SCENARIOS = {
    # unequal pieces, class weights summed per piece, fresh flips each epoch
    "weighted": dict(class_weight="balanced", augment="flip"),
    # the frozen trunk computed per rank on its pieces, the head probed on rank 0 only
    "trunk": dict(freeze=2, augment="dihedral", frozen_cache="memory",
                  head_init="linear_probe"),
    # the source head trained through the wrapper, validation scored in two shards
    "lwf": dict(regularization="lwf", early_stopping=True, validation_fraction=0.3,
                n_iter_no_change=5),
    # a stage thaws in the second epoch: the wrapper is rebuilt, the trunk moves
    "thaw": dict(freeze=2, unfreeze_schedule=1, regularization="l2sp"),
    # batch statistics: per piece, averaged over the ranks at the end of each epoch
    "batch": dict(batchnorm="batch"),
}


def make_clf(**params) -> FineTuneClassifier:
    defaults = dict(backbone=tiny_net(), weights=None, image_size=SIZE, max_iter=2,
                    batch_size=7, learning_rate_init=1e-2, freeze=None, batchnorm="fixed",
                    device="cpu", random_state=0, callbacks=[Snapshots()])
    return FineTuneClassifier(**{**defaults, **params})


def record(clf: FineTuneClassifier, X) -> dict:
    return {"weights": clf.model_.state_dict(), "snapshots": clf.snapshots_,
            "history": clf.history_, "world_size": clf.world_size_,
            "predict": clf.predict(X), "proba": clf.predict_proba(X)}


def error_of(fit) -> str:
    try:
        fit()
    except ValueError as exc:
        return str(exc)
    return "no error"


def train_on_rank(rank: int, world: int, port: int, folder: str) -> None:
    """One of the processes: every scenario, the checkpoint, the errors; saves what it saw."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    X, y = make_images()
    seen = {name: record(make_clf(**params).fit(X, y), X) for name, params in SCENARIOS.items()}
    seen["backend"] = dist.get_backend()

    writes = []
    save = _callbacks.save_checkpoint
    _callbacks.save_checkpoint = lambda path, state, **identity: (
        writes.append(state.epoch), save(path, state, **identity))
    checkpoint = os.path.join(folder, "fit.ckpt")
    clf = make_clf(checkpoint=checkpoint, **SCENARIOS["weighted"]).fit(X, y)
    seen["checkpoint writes"] = list(writes)
    resumed = make_clf(checkpoint=checkpoint, **SCENARIOS["weighted"]).fit(X, y)
    seen["resumed equal"] = all(torch.equal(a, b) for a, b in zip(
        clf.model_.state_dict().values(), resumed.model_.state_dict().values(), strict=True))
    seen["writes after resume"] = len(writes)
    seen["pickles"] = len(pickle.dumps(clf)) > 0  # no process group reachable from it
    seen["plain module"] = type(clf.model_) is nn.Sequential and not any(
        m._forward_hooks or m._forward_pre_hooks for m in clf.model_.modules())
    if rank == 0:
        with open(os.path.join(folder, "model.pkl"), "wb") as handle:
            pickle.dump(clf, handle)
    seen["written"] = record(clf, X)

    seen["small batch"] = error_of(lambda: make_clf(batch_size=3).fit(X, y))
    seen["other labels"] = error_of(lambda: make_clf().fit(X, y if rank == 0 else y[::-1]))
    torch.save(seen, os.path.join(folder, f"rank{rank}.pt"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(fn, args, deadline: float = 180) -> None:
    """Run ``fn(rank, *args)`` in ``WORLD`` processes; kill them all past the deadline."""
    context = mp.spawn(fn, args=args, nprocs=WORLD, join=False)
    start = time.monotonic()
    while not context.join(timeout=1):
        if time.monotonic() - start > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} processes did not finish in {deadline} s")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        spawn(train_on_rank, (WORLD, free_port(), str(folder)))
    finally:
        if previous is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    # Written a moment ago by this test's own child processes in a fresh temporary folder:
    # histories, error messages and flags, which weights_only=True does not load.
    seen = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return folder, seen


@pytest.fixture(scope="module")
def single(one_torch_thread):
    X, y = make_images()
    return {name: record(make_clf(**SCENARIOS[name]).fit(X, y), X)
            for name in SCENARIOS if name != "batch"}


def assert_weights_close(distributed: dict, alone: dict) -> None:
    assert distributed.keys() == alone.keys()
    for name, value in alone.items():
        torch.testing.assert_close(distributed[name], value, **TOLERANCE, msg=name)


def assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", [name for name in SCENARIOS if name != "batch"])
def test_two_processes_train_the_weights_of_one(ranks, single, name):
    _, seen = ranks
    alone = single[name]
    for rank in seen:
        run = rank[name]
        assert run["world_size"] == WORLD and alone["world_size"] == 1
        assert len(run["snapshots"]) == len(alone["snapshots"]) == 2
        for after_epoch, expected in zip(run["snapshots"], alone["snapshots"], strict=True):
            assert_weights_close(after_epoch, expected)
        assert_weights_close(run["weights"], alone["weights"])
        # the epoch's loss and validation score are those of the whole split
        for mine, theirs in zip(run["history"], alone["history"], strict=True):
            assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
            assert mine["valid_score"] == theirs["valid_score"]
    assert_same_weights(seen[0][name]["weights"], seen[1][name]["weights"])
    assert seen[0][name]["history"] == seen[1][name]["history"]


def test_batch_statistics_differ_from_one_process_but_agree_across_ranks(ranks, one_torch_thread):
    """Each rank normalises its piece with the piece's statistics (no SyncBatchNorm on the
    CPU), so the run is not one process's; the running statistics are averaged over the ranks,
    so every rank ends with the same network, buffers included."""
    _, seen = ranks
    first, second = seen[0]["batch"]["weights"], seen[1]["batch"]["weights"]
    assert_same_weights(first, second)
    X, y = make_images()
    alone = make_clf(**SCENARIOS["batch"]).fit(X, y).model_.state_dict()
    assert not torch.allclose(first["1.running_var"], alone["1.running_var"], **TOLERANCE)
    assert not torch.equal(first["1.running_var"], torch.ones(8))  # statistics were learnt


def test_rank_0_alone_writes_the_checkpoint_which_every_rank_resumes(ranks):
    folder, seen = ranks
    assert seen[0]["checkpoint writes"] == [1, 2]
    assert seen[1]["checkpoint writes"] == []
    assert (folder / "fit.ckpt").is_file()
    for rank in seen:  # the finished fit is loaded, not trained again
        assert rank["resumed equal"] and rank["writes after resume"] == len(
            rank["checkpoint writes"])


def test_the_result_is_a_plain_classifier_that_predicts_in_one_process(ranks):
    folder, seen = ranks
    assert seen[0]["backend"] == "gloo"
    for rank in seen:
        assert rank["pickles"] and rank["plain module"]
    assert_same_weights(seen[0]["written"]["weights"], seen[1]["written"]["weights"])
    with open(folder / "model.pkl", "rb") as handle:
        loaded = pickle.load(handle)
    assert loaded.world_size_ == WORLD
    X, _ = make_images()
    assert_same_weights(loaded.model_.state_dict(), seen[1]["written"]["weights"])
    for rank in seen:
        assert np.array_equal(loaded.predict(X), rank["written"]["predict"])
        np.testing.assert_allclose(loaded.predict_proba(X), rank["written"]["proba"],
                                   rtol=1e-6, atol=1e-7)


def test_every_rank_raises_the_same_clear_error(ranks):
    _, seen = ranks
    for rank in seen:
        assert "batch_size=3 is the global batch, split over 2 processes" in rank["small batch"]
        assert "pass batch_size >= 4" in rank["small batch"]
        assert "differ in their labels" in rank["other labels"]
    assert seen[0]["other labels"] == seen[1]["other labels"]


# ------------------------------------------------------------- the shards


class Reading(list):
    """A list of images that records which items are read."""

    def __init__(self, items):
        super().__init__(items)
        self.read: set[int] = set()

    def __getitem__(self, index):
        self.read.add(index)
        return super().__getitem__(index)


CONFIG = Preprocessing(crop_size=SIZE, resize_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3)


def epoch(n: int, shard=None, trunk=None, **options):
    X, y = make_images(n)
    images = Reading(list(X))
    batches = ImageBatches(images, (y == "b").astype(int), range(n), CONFIG, 7, shuffle=True,
                           generator=torch.Generator().manual_seed(3), shard=shard, **options)
    if trunk is not None:
        batches.use_trunk(trunk, torch.device("cpu"))
    return list(batches), images.read, len(batches)


@pytest.mark.parametrize("augment, cut", [(None, False), ("flip", False), ("dihedral", True)])
def test_each_rank_reads_and_gets_its_piece_of_every_batch_one_process_draws(augment, cut):
    trunk = split_network(tiny_net().eval(), (("0",), ("1",), ("3",), ("4",)), 2) if cut else None
    whole, _, count = epoch(N_IMAGES, augment=augment, trunk=trunk)
    pieces = [epoch(N_IMAGES, shard=(rank, WORLD), augment=augment, trunk=trunk)
              for rank in range(WORLD)]
    assert count == pieces[0][2] == pieces[1][2] == 4
    assert [len(y) for _, y in pieces[0][0]] == [4, 4, 4, 3]
    assert [len(y) for _, y in pieces[1][0]] == [3, 3, 3, 2]
    for b, (images, y) in enumerate(whole):
        torch.testing.assert_close(torch.cat([pieces[0][0][b][0], pieces[1][0][b][0]]), images,
                                   rtol=1e-6, atol=1e-6)
        assert torch.equal(torch.cat([pieces[0][0][b][1], pieces[1][0][b][1]]), y)
    read = [piece[1] for piece in pieces]
    assert read[0] and read[1] and not read[0] & read[1]  # each decodes its own images only
    assert read[0] | read[1] == set(range(N_IMAGES))


def test_a_final_batch_too_small_to_split_is_left_out_and_validation_is_split_in_parts():
    # 24 images in batches of 7: a final batch of 3, kept by one process, not split in 2 + 1
    assert epoch(24)[2] == 4
    assert epoch(24, shard=(0, WORLD))[2] == epoch(24, shard=(1, WORLD))[2] == 3
    X, _ = make_images(9)
    parts = [ImageBatches(list(X), np.zeros(9, dtype=int), range(9), CONFIG, 7,
                          shard=(rank, WORLD)) for rank in range(WORLD)]
    assert [part.indices for part in parts] == [[0, 1, 2, 3, 4], [5, 6, 7, 8]]


def test_torchrun_environment_counts_only_when_complete(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_world() == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert torchrun_world() == 1  # no RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    assert torchrun_world() == 2


# ------------------------------------------------------------- python -m skt.train


def test_skt_train_under_torchrun_writes_one_model_that_one_process_reproduces(
        image_folder, tmp_path, one_torch_thread, capsys):
    arguments = [str(image_folder), "--backbone", "shufflenet_v2_x0_5", "--weights", "none",
                 "--image-size", "32", "--max-iter", "1", "--batch-size", "8", "--freeze",
                 "none", "--batchnorm", "fixed", "--random-state", "0", "--device", "cpu"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(WORLD), "-m", "skt.train", *arguments, "-o", str(tmp_path / "two.skt")],
        capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("wrote ") == 1  # rank 0 alone
    assert f"by {WORLD} processes" in result.stdout

    assert train_main([*arguments, "-o", str(tmp_path / "one.pkl")]) == 0
    assert "with pickle" in capsys.readouterr().out
    two = skt.load(tmp_path / "two.skt")
    with open(tmp_path / "one.pkl", "rb") as handle:
        one = pickle.load(handle)
    assert two.world_size_ == WORLD and one.world_size_ == 1
    assert_weights_close(two.model_.state_dict(), one.model_.state_dict())
    paths, _ = skt.load_image_folder(image_folder)
    assert np.array_equal(two.predict(paths), one.predict(paths))


def test_skt_train_refuses_an_output_it_cannot_write_before_training(image_folder, tmp_path,
                                                                     capsys):
    with pytest.raises(SystemExit) as exit_status:
        train_main([str(image_folder), "-o", str(tmp_path / "model.joblib")])
    assert exit_status.value.code == 2
    assert ".skt (skt.save, no pickle) or .pkl" in capsys.readouterr().err
    assert train_main([str(tmp_path / "nowhere"), "-o", str(tmp_path / "m.skt")]) == 1
    assert "is not a directory" in capsys.readouterr().err
