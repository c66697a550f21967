"""skt._utils: the helpers written once."""

import errno
import os
import threading
from pathlib import Path

import pytest
import torch

from skt._utils import (
    LRU,
    atomic_open,
    atomic_write,
    available_cores,
    close_matches,
    expand_path,
    huge_pages,
    memory_format,
    request_huge_pages,
    resolve_num_workers,
)


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "deep" / "file.bin"
    atomic_write(path, b"first")
    atomic_write(path, b"second", durable=True)
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.bin"]


def test_a_failed_write_keeps_the_previous_content(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write(path, b"kept")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_open(path) as handle:
        handle.write(b"half")
        raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"kept"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_a_failed_write_names_the_file(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write(path, b"kept")
    # What a full disk does: write() fails with an error that names no file.
    with pytest.raises(OSError) as caught, atomic_open(path) as handle:
        handle.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert str(caught.value) == f"[Errno 28] No space left on device: '{path}'"
    assert path.read_bytes() == b"kept" and os.listdir(tmp_path) == ["file.bin"]


def test_an_error_naming_a_file_is_left_as_it_is(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"")
    with pytest.raises(FileExistsError) as caught:
        atomic_write(blocker / "file.bin", b"data")  # its folder would be a file
    assert caught.value.filename == str(blocker)


def test_expand_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert expand_path("~/data") == tmp_path / "data"
    assert expand_path(Path("~", "data")) == tmp_path / "data"
    assert expand_path("~") == tmp_path
    assert expand_path("data/~") == Path("data/~")  # only a leading ~ is a home folder
    assert expand_path(tmp_path / "x") == tmp_path / "x"
    with pytest.raises(ValueError, match=r"Cannot expand '~' in '~no-such-user-skt/x' .*; pass "
                                         r"an absolute path instead\."):
        expand_path("~no-such-user-skt/x")


def test_lru_by_count_evicts_the_least_recently_used():
    cache = LRU(max_items=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
    cache.put("a", 99)  # an existing key keeps its value
    assert cache.get("a") == 1 and len(cache) == 2


def test_lru_by_bytes_and_clear():
    cache = LRU(max_bytes=10, size_of=len)
    cache.put(1, b"12345")
    cache.put(2, b"123456")  # 11 bytes: the oldest goes
    assert cache.get(1) is None and cache.get(2) == b"123456" and cache.nbytes == 6
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_get_or_make_makes_once_and_shares_across_threads():
    cache = LRU(max_items=4)
    made = []
    barrier = threading.Barrier(4)

    def make():
        made.append(1)
        return object()

    results = []

    def worker():
        barrier.wait()
        results.append(cache.get_or_make("key", make))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(r) for r in results}) == 1  # every thread got the kept value
    assert cache.get_or_make("key", make) is results[0]


def test_num_workers_default_and_explicit(monkeypatch):
    assert resolve_num_workers(0) == 0 and resolve_num_workers(3) == 3
    monkeypatch.setattr("skt._utils.available_cores", lambda: 2)
    assert resolve_num_workers(None) == 2
    monkeypatch.setattr("skt._utils.available_cores", lambda: 64)
    assert resolve_num_workers(None) == 4
    assert available_cores() >= 1


def test_memory_format_and_close_matches():
    assert memory_format("cpu") == torch.channels_last
    assert memory_format(torch.device("meta")) == torch.contiguous_format
    assert close_matches("layer5", ["layer4", "layer3", "fc"]) == (
        " Close matches: ['layer4', 'layer3'].")
    assert close_matches("zzz", ["layer4"]) == ""


def test_request_huge_pages_sets_the_variable_only_before_torch_and_unless_set():
    environ = {}
    request_huge_pages(environ, modules={"numpy"})
    assert environ == {"THP_MEM_ALLOC_ENABLE": "1"}
    environ = {"THP_MEM_ALLOC_ENABLE": "0"}  # the user's choice stays
    request_huge_pages(environ, modules={"numpy"})
    assert environ == {"THP_MEM_ALLOC_ENABLE": "0"}
    environ = {}
    request_huge_pages(environ, modules={"numpy", "torch"})  # too late: torch may have read it
    assert environ == {}


_FAULTS_OF_A_TENSOR = """
import os, resource, sys
os.environ.pop("THP_MEM_ALLOC_ENABLE", None)
from skt.cli import main
assert "torch" not in sys.modules
print(main(["compare", sys.argv[1]]), os.environ.get("THP_MEM_ALLOC_ENABLE"))
import torch
torch.zeros(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(64 << 18)  # 64 MiB: 16,384 pages of 4 KiB
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_the_command_puts_torch_tensors_on_huge_pages(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_TENSOR, str(tmp_path / "none")],
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    status_and_variable, faults = result.stdout.split("\n")[:2]
    assert status_and_variable == "1 1"  # the folder is missing; the variable was set first
    if not huge_pages().startswith("madvise"):
        pytest.skip(f"the kernel's huge page mode is {huge_pages().split(',')[0]}, not madvise: "
                    "the variable decides nothing there")
    assert int(faults) < 2048, faults  # 4 KiB pages would fault 16,384 times
