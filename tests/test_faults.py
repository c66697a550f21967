"""``skt extract`` killed with SIGKILL mid-run, then run again: the bytes of an uninterrupted run.

The killed run is a child process (``python -m skt``); the resumed run and
the reference go through :func:`skt.cli.main` in this process. All run torch
on one thread, so their features can be compared byte for byte.
"""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from skt.cli import kill_and_resume, main, read_jsonl

pytestmark = [pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX"),
              pytest.mark.usefixtures("one_torch_thread")]

N_IMAGES = 96
BATCH = 8
ARGS = ["--backbone", "resnet18", "--weights", "none", "--random-state", "0",
        "--image-size", "32", "--batch-size", str(BATCH), "--engine", "torch"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
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


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
def test_killed_extract_resumes_to_the_same_bytes(suffix, cached, folder, tmp_path):
    def argv(name):
        cache = ["--cache", str(tmp_path / f"cache-{name}")] if cached else []
        return ["extract", str(folder), "-o", str(tmp_path / name / f"f{suffix}"), *ARGS,
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
