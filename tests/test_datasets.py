"""Benchmark data loaders: real ELPV and digits, synthetic and real Fashion-MNIST IDX files."""

from __future__ import annotations

import doctest
import gzip
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from skt import datasets
from skt.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FOLDER,
    load_digits_images,
    load_elpv,
    load_fashion_mnist,
    subsample,
)

needs_elpv = pytest.mark.usefixtures("elpv_installed")
ELPV_STEP = 44  # decode every 44th cell: 60 of 2,624, mono and poly, in a fraction of the time

# ---------------------------------------------------------------------- ELPV --


@pytest.fixture(scope="module")
def elpv_paths():
    return load_elpv(return_paths=True)


@pytest.fixture(scope="module")
def elpv_arrays():
    """Array mode on every ``ELPV_STEP``-th row of labels.csv."""
    read_labels = datasets._read_elpv_labels

    def every_step(labels):
        names, probability, cell_type = read_labels(labels)
        return names[::ELPV_STEP], probability[::ELPV_STEP], cell_type[::ELPV_STEP]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets, "_read_elpv_labels", every_step)
        return load_elpv()


@needs_elpv
def test_elpv_arrays(elpv_arrays):
    assert elpv_arrays.images.shape == (60, 300, 300)
    assert elpv_arrays.images.dtype == np.uint8
    assert elpv_arrays.target.dtype == np.int64
    assert set(elpv_arrays.cell_type) == {"mono", "poly"}
    # Real cells, not blank frames.
    assert 0 < elpv_arrays.images.mean() < 255


@needs_elpv
def test_elpv_counts(elpv_paths):
    assert elpv_paths.target.dtype == np.int64
    assert np.bincount(elpv_paths.target).tolist() == [1803, 821]


@needs_elpv
def test_elpv_fields(elpv_paths):
    assert elpv_paths.probability.dtype == np.float64
    assert np.allclose(np.unique(elpv_paths.probability), [0, 1 / 3, 2 / 3, 1])
    types, counts = np.unique(elpv_paths.cell_type, return_counts=True)
    assert types.tolist() == ["mono", "poly"]
    assert counts.tolist() == [1074, 1550]
    assert "Solar Energy 185 (2019)" in elpv_paths.DESCR
    assert "Buerhop-Lutz" in elpv_paths.DESCR
    assert "CC BY-NC-SA 4.0" in elpv_paths.DESCR


@needs_elpv
def test_elpv_paths_match_arrays(elpv_paths, elpv_arrays):
    paths = elpv_paths.images
    assert isinstance(paths, list) and len(paths) == 2624
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in paths)
    assert Path(paths[0]).name == "cell0001.png"
    np.testing.assert_array_equal(elpv_paths.target[::ELPV_STEP], elpv_arrays.target)
    np.testing.assert_array_equal(elpv_paths.probability[::ELPV_STEP], elpv_arrays.probability)
    for row, path in enumerate(paths[::ELPV_STEP]):
        with Image.open(path) as image:
            np.testing.assert_array_equal(np.asarray(image), elpv_arrays.images[row])


@needs_elpv
@pytest.mark.parametrize(("threshold", "n_defective"),
                         [(0.0, 2624), (0.25, 1116), (0.5, 821), (0.7, 715), (1.0, 715)])
def test_elpv_threshold(threshold, n_defective):
    elpv = load_elpv(threshold=threshold, return_paths=True)
    assert elpv.target.sum() == n_defective


@needs_elpv
@pytest.mark.parametrize("threshold", [-0.1, 1.5, True])
def test_elpv_bad_threshold(threshold):
    with pytest.raises(ValueError, match=r"threshold must be a probability in \[0, 1\]"):
        load_elpv(threshold=threshold)


def test_elpv_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "elpv_dataset", None)
    with pytest.raises(ImportError, match=re.escape(
            "pip install elpv-dataset (or pip install 'skt[bench]')")):
        load_elpv()


@pytest.fixture
def fake_elpv(tmp_path, monkeypatch):
    """An elpv-dataset data folder with one 300x300 cell, as tmp_path."""
    monkeypatch.setattr(datasets, "_elpv_folder", lambda: tmp_path)
    (tmp_path / "images").mkdir()
    Image.new("L", (300, 300), 7).save(tmp_path / "images" / "cell0001.png")
    (tmp_path / "labels.csv").write_text("images/cell0001.png  0.3333333333333333  mono\n\n")
    return tmp_path


def test_elpv_fake_folder(fake_elpv):
    elpv = load_elpv(threshold=0.3)
    assert elpv.images.shape == (1, 300, 300) and (elpv.images == 7).all()
    assert elpv.target.tolist() == [1]
    assert elpv.cell_type.tolist() == ["mono"]


def test_elpv_wrong_image_size(fake_elpv):
    bad = fake_elpv / "images" / "cell0001.png"
    Image.new("L", (30, 30)).save(bad)
    assert load_elpv(return_paths=True).images == [str(bad)]  # paths are not decoded
    with pytest.raises(ValueError, match=re.escape(
            f"{str(bad)!r} holds a uint8 image of shape (30, 30), not the uint8 (300, 300)")):
        load_elpv()


def test_elpv_bad_labels(fake_elpv):
    labels = fake_elpv / "labels.csv"
    labels.write_text("images/cell0001.png 1.0\n")
    with pytest.raises(ValueError, match=re.escape(
            f"{str(labels)!r} line 1: expected 'path probability type', "
            "got 'images/cell0001.png 1.0'.")):
        load_elpv()
    labels.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"{str(labels)!r} does not exist; the elpv-dataset install is incomplete.")):
        load_elpv()


# ------------------------------------------------------------- Fashion-MNIST --

def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """IDX encoding of a uint8 array (magic 0x0000080N for N dimensions)."""
    magic = (0x08 << 8 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, name: str, payload: bytes, compress: bool) -> Path:
    path = folder / (f"{name}.gz" if compress else name)
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


@pytest.fixture
def fashion_arrays():
    rng = np.random.default_rng(0)
    return {
        "train": (rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
                  np.array([0, 1, 2, 9, 9, 5], dtype=np.uint8)),
        "t10k": (rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
                 np.array([7, 3, 0], dtype=np.uint8)),
    }


def write_fashion(folder: Path, arrays: dict, compress: bool) -> Path:
    for prefix, (images, labels) in arrays.items():
        write_idx(folder, f"{prefix}-images-idx3-ubyte", idx_bytes(images), compress)
        write_idx(folder, f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), compress)
    return folder


@pytest.fixture
def fresh_machine(tmp_path, monkeypatch):
    """No Fashion-MNIST anywhere: an empty $SKT_DATA and no Debian folder; returns $SKT_DATA."""
    home = tmp_path / "skt-data"
    home.mkdir()
    monkeypatch.setenv("SKT_DATA", str(home))
    monkeypatch.setattr(datasets, "FASHION_MNIST_FOLDER", tmp_path / "no-debian")
    return home


def skip_without_fashion_data():
    """Skip unless the real files are where ``load_fashion_mnist()`` looks."""
    try:
        datasets._find_fashion_folder(None)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST files not found; to run: apt-get install "
                    "dataset-fashion-mnist, or put the four IDX files in $SKT_DATA/fashion-mnist "
                    "(default ~/skt_data/fashion-mnist)")


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize(("subset", "prefix"), [("train", "train"), ("test", "t10k")])
def test_fashion_round_trip(tmp_path, fashion_arrays, compress, subset, prefix):
    write_fashion(tmp_path, fashion_arrays, compress)
    data = load_fashion_mnist(tmp_path, subset=subset)
    images, labels = fashion_arrays[prefix]
    assert data.images.dtype == np.uint8 and data.images.flags.writeable
    np.testing.assert_array_equal(data.images, images)
    assert data.target.dtype == np.int64
    np.testing.assert_array_equal(data.target, labels)
    assert data.target_names.tolist() == list(FASHION_MNIST_CLASSES)
    assert "Xiao" in data.DESCR and "MIT" in data.DESCR


def test_fashion_debian_folder_last(fresh_machine):
    assert FASHION_MNIST_FOLDER == Path("/usr/share/datasets/fashion-mnist")
    assert datasets._fashion_folders(None)[-1] == datasets.FASHION_MNIST_FOLDER
    assert datasets.FASHION_MNIST_FOLDER not in datasets._fashion_folders(fresh_machine)


def test_fashion_target_names():
    assert FASHION_MNIST_CLASSES == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


REMEDIES = (
    "Get the data in one of two ways:\n"
    "  - apt-get install dataset-fashion-mnist (Debian, Ubuntu) fills {debian}, searched when "
    "data_home=None;\n"
    "  - download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz from "
    "https://github.com/zalandoresearch/fashion-mnist/tree/master/data/fashion into "
    "{home}/fashion-mnist, or into any folder and pass it as data_home= (or set SKT_DATA to it)."
)


def test_fashion_not_found_on_fresh_machine(fresh_machine, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(subset="test")
    assert str(info.value) == (
        "Fashion-MNIST not found: none of its IDX files is in any of\n"
        f"  {fresh_machine}/fashion-mnist\n"
        f"  {fresh_machine}/FashionMNIST/raw\n"
        f"  {fresh_machine}\n"
        f"  {tmp_path}/no-debian\n"
        + REMEDIES.format(debian=tmp_path / "no-debian", home=fresh_machine))


def test_fashion_not_found_in_data_home(fresh_machine, tmp_path):
    """An explicit data_home is the only place searched: not $SKT_DATA, not Debian's folder."""
    write_fashion(fresh_machine, {"t10k": (np.zeros((1, 28, 28)), np.zeros(1))}, False)
    folder = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(folder)
    assert str(info.value) == (
        "Fashion-MNIST not found: none of its IDX files is in any of\n"
        f"  {folder}/fashion-mnist\n"
        f"  {folder}/FashionMNIST/raw\n"
        f"  {folder}\n"
        + REMEDIES.format(debian=tmp_path / "no-debian", home=folder))


@pytest.mark.parametrize("layout", ["fashion-mnist", "FashionMNIST/raw", "."])
def test_fashion_found_in_skt_data(fresh_machine, fashion_arrays, layout):
    folder = fresh_machine / layout
    folder.mkdir(parents=True, exist_ok=True)
    write_fashion(folder, fashion_arrays, compress=True)
    np.testing.assert_array_equal(load_fashion_mnist(subset="test").images,
                                  fashion_arrays["t10k"][0])


def test_fashion_found_in_home_default(fresh_machine, tmp_path, monkeypatch, fashion_arrays):
    monkeypatch.delenv("SKT_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / "skt_data" / "fashion-mnist"
    folder.mkdir(parents=True)
    write_fashion(folder, fashion_arrays, compress=False)
    np.testing.assert_array_equal(load_fashion_mnist().target, fashion_arrays["train"][1])
    assert len(load_fashion_mnist("~/skt_data", subset="test").target) == 3  # ~ is expanded


def test_fashion_expands_tilde_in_skt_data_and_paths(fresh_machine, tmp_path, monkeypatch,
                                                     fashion_arrays):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SKT_DATA", "~/elsewhere")
    folder = tmp_path / "elsewhere" / "fashion-mnist"
    folder.mkdir(parents=True)
    write_fashion(folder, fashion_arrays, compress=False)
    assert datasets._data_home(None) == tmp_path / "elsewhere"
    assert len(load_fashion_mnist(subset="test").target) == 3
    assert len(load_fashion_mnist(Path("~", "elsewhere"), subset="test").target) == 3
    with pytest.raises(FileNotFoundError, match=f"none of its IDX files is in any of\n"
                                                f"  {tmp_path}/nowhere/fashion-mnist\n"):
        load_fashion_mnist(Path("~/nowhere"))


def test_fashion_search_order(fresh_machine, tmp_path, monkeypatch, fashion_arrays):
    """$SKT_DATA/fashion-mnist before torchvision's layout before Debian's folder."""
    debian = tmp_path / "debian"
    debian.mkdir()
    write_fashion(debian, fashion_arrays, compress=True)
    monkeypatch.setattr(datasets, "FASHION_MNIST_FOLDER", debian)
    assert len(load_fashion_mnist().target) == 6
    one = {"train": (np.full((1, 28, 28), 1), np.array([1])),
           "t10k": (np.zeros((1, 28, 28)), np.array([0]))}
    (fresh_machine / "FashionMNIST" / "raw").mkdir(parents=True)
    write_fashion(fresh_machine / "FashionMNIST" / "raw", one, compress=False)
    assert load_fashion_mnist().target.tolist() == [1]
    two = {"train": (np.full((2, 28, 28), 2), np.array([2, 2])),
           "t10k": (np.zeros((1, 28, 28)), np.array([0]))}
    (fresh_machine / "fashion-mnist").mkdir()
    write_fashion(fresh_machine / "fashion-mnist", two, compress=False)
    assert load_fashion_mnist().target.tolist() == [2, 2]
    # An explicit data_home wins over everything.
    assert len(load_fashion_mnist(debian).target) == 6


def test_fashion_missing_file(tmp_path, fashion_arrays):
    write_fashion(tmp_path, fashion_arrays, compress=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(
            "Neither 't10k-labels-idx1-ubyte' nor 't10k-labels-idx1-ubyte.gz' is in "
            f"{str(tmp_path)!r}, which holds other Fashion-MNIST files; download "
            "'t10k-labels-idx1-ubyte.gz' from https://github.com/zalandoresearch/")):
        load_fashion_mnist(tmp_path, subset="test")


def test_fashion_bad_subset(tmp_path):
    with pytest.raises(ValueError, match="subset must be 'train' or 'test'; got 'valid'"):
        load_fashion_mnist(tmp_path, subset="valid")


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_fashion_wrong_magic(tmp_path, fashion_arrays, compress):
    write_fashion(tmp_path, fashion_arrays, compress)
    # An image file where the labels should be: 3 dimensions instead of 1.
    labels = write_idx(tmp_path, "train-labels-idx1-ubyte",
                       idx_bytes(np.zeros(6, np.uint8), magic=0x00000803), compress)
    with pytest.raises(ValueError, match=re.escape(
            f"{str(labels)!r} has magic number 0x00000803, expected 0x00000801 "
            "(unsigned bytes, 1 dimensions)")):
        load_fashion_mnist(tmp_path)


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_fashion_truncated_data(tmp_path, fashion_arrays, compress):
    write_fashion(tmp_path, fashion_arrays, compress)
    images = write_idx(tmp_path, "train-images-idx3-ubyte",
                       idx_bytes(fashion_arrays["train"][0])[:-1], compress)
    with pytest.raises(ValueError, match=re.escape(
            f"{str(images)!r} declares shape (6, 28, 28) (4704 bytes of data) but holds 4703; "
            "the file is truncated or corrupt.")):
        load_fashion_mnist(tmp_path)


def test_fashion_truncated_header(tmp_path, fashion_arrays):
    write_fashion(tmp_path, fashion_arrays, compress=False)
    images = write_idx(tmp_path, "train-images-idx3-ubyte", b"\x00\x00\x08\x03\x00", False)
    with pytest.raises(ValueError, match=re.escape(
            f"{str(images)!r} is 5 bytes, shorter than the 16-byte IDX header")):
        load_fashion_mnist(tmp_path)


@pytest.mark.parametrize("damage", [lambda gz: gz[:100],
                                    lambda gz: gz[:20] + bytes(len(gz) - 20),
                                    lambda gz: gz[:-4] + b"\xff" * 4,
                                    lambda gz: gz[:3] + b"\xff" + gz[4:]],
                         ids=["truncated", "zeroed", "bad-size", "bad-flags"])
def test_fashion_bad_gzip(tmp_path, fashion_arrays, damage):
    write_fashion(tmp_path, fashion_arrays, compress=True)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    images.write_bytes(damage(images.read_bytes()))
    with pytest.raises(ValueError, match=re.escape(
            f"{str(images)!r} is not a readable gzip file (")):
        load_fashion_mnist(tmp_path)


def test_fashion_gzip_recognised_by_content(tmp_path, fashion_arrays):
    """A .gz name on raw bytes (a browser decompressed it) and gzip without .gz both load."""
    write_fashion(tmp_path, fashion_arrays, compress=False)
    raw = tmp_path / "train-images-idx3-ubyte"
    raw.rename(tmp_path / "train-images-idx3-ubyte.gz")
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(gzip.compress(labels.read_bytes()))
    data = load_fashion_mnist(tmp_path)
    np.testing.assert_array_equal(data.images, fashion_arrays["train"][0])
    np.testing.assert_array_equal(data.target, fashion_arrays["train"][1])


def test_fashion_count_mismatch(tmp_path, fashion_arrays):
    write_fashion(tmp_path, fashion_arrays, compress=False)
    write_idx(tmp_path, "train-labels-idx1-ubyte", idx_bytes(np.zeros(4, np.uint8)), False)
    with pytest.raises(ValueError, match=r"holds 6 images but .* holds 4 labels"):
        load_fashion_mnist(tmp_path)


def test_fashion_label_out_of_range(tmp_path, fashion_arrays):
    write_fashion(tmp_path, fashion_arrays, compress=False)
    write_idx(tmp_path, "train-labels-idx1-ubyte", idx_bytes(np.full(6, 10, np.uint8)), False)
    with pytest.raises(ValueError, match="has label 10; Fashion-MNIST labels are 0-9"):
        load_fashion_mnist(tmp_path)


@pytest.mark.parametrize(("subset", "n_per_class"), [("train", 6000), ("test", 1000)])
def test_fashion_real_files(subset, n_per_class):
    skip_without_fashion_data()
    data = load_fashion_mnist(subset=subset)
    assert data.images.shape == (10 * n_per_class, 28, 28)
    assert data.images.dtype == np.uint8 and data.images.max() == 255
    assert np.bincount(data.target).tolist() == [n_per_class] * 10


# -------------------------------------------------------------------- digits --

def test_digits_images_values():
    source = load_digits().images
    digits = load_digits_images()
    assert digits.images.shape == (1797, 64, 64)
    assert digits.images.dtype == np.uint8
    assert digits.target.dtype == np.int64 and digits.target.shape == (1797,)
    assert digits.target_names.tolist() == list(range(10))
    # Averaging each 8x8 block recovers the source grid, scaled 0-16 -> 0-255.
    blocks = digits.images.reshape(1797, 8, 8, 8, 8).astype(float).mean(axis=(2, 4))
    assert np.abs(blocks - source * 255 / 16).mean() < 25
    assert np.corrcoef(blocks.ravel(), source.ravel())[0, 1] > 0.95
    assert digits.images.max() == 255 and digits.images.min() == 0
    # A pixel surrounded by ink keeps full value at the centre of its block.
    full = np.argwhere((source[:, 1:-1, 1:-1] == 16)
                       & (np.lib.stride_tricks.sliding_window_view(
                           source, (3, 3), axis=(1, 2)).min(axis=(-1, -2)) == 16))[0]
    n, row, col = full[0], full[1] + 1, full[2] + 1
    assert digits.images[n, row * 8 + 3:row * 8 + 5, col * 8 + 3:col * 8 + 5].min() == 255


def test_digits_images_size_not_multiple_of_8():
    digits = load_digits_images(size=12)
    assert digits.images.shape == (1797, 12, 12)
    assert np.corrcoef(digits.images[:, ::3, ::3].ravel().astype(float),
                       load_digits().images[:, ::2, ::2].ravel())[0, 1] > 0.8


@pytest.mark.parametrize("size", [7, 0, 64.0, True])
def test_digits_images_bad_size(size):
    with pytest.raises(ValueError, match="size must be an integer >= 8"):
        load_digits_images(size=size)


# ----------------------------------------------------------------- subsample --

@needs_elpv
def test_subsample_stratified(elpv_paths):
    small = subsample(elpv_paths, 100, random_state=0)
    assert len(small.images) == len(small.target) == len(small.probability) == 100
    assert isinstance(small.images, list)
    assert np.bincount(small.target).tolist() == [69, 31]  # 1803:821 of 100
    assert small.DESCR == elpv_paths.DESCR
    index = [elpv_paths.images.index(path) for path in small.images]
    assert index == sorted(index)
    np.testing.assert_array_equal(small.target, elpv_paths.target[index])
    np.testing.assert_array_equal(small.cell_type, elpv_paths.cell_type[index])


def test_subsample_reproducible_and_fraction():
    digits = load_digits_images(size=8)
    first = subsample(digits, 0.1, random_state=1)
    again = subsample(digits, 0.1, random_state=1)
    other = subsample(digits, 0.1, random_state=2)
    assert len(first.target) == 179  # floor(0.1 * 1797), as train_test_split rounds
    np.testing.assert_array_equal(first.images, again.images)
    assert not np.array_equal(first.images, other.images)
    assert first.target_names.tolist() == list(range(10))


def test_subsample_all_and_too_many():
    digits = load_digits_images(size=8)
    every = subsample(digits, 1797)
    np.testing.assert_array_equal(every.images, digits.images)
    np.testing.assert_array_equal(subsample(digits, 1.0).target, digits.target)
    assert len(subsample(digits, 10, random_state=0).target) == 10
    with pytest.raises(ValueError, match="n=1798 is more than the 1797 samples"):
        subsample(digits, 1798)


# ------------------------------------------------------------------ examples --

def docstring_examples() -> dict[str, doctest.DocTest]:
    """The doctests of skt.datasets by function name, found afresh (running one clears it)."""
    return {test.name.rsplit(".", 1)[-1]: test
            for test in doctest.DocTestFinder().find(datasets) if test.examples}


def test_every_loader_has_examples():
    assert sorted(docstring_examples()) == ["load_digits_images", "load_elpv",
                                            "load_fashion_mnist", "subsample"]


@pytest.mark.parametrize("name", sorted(docstring_examples()))
def test_docstring_examples_run(name, request):
    if name == "load_elpv":
        request.getfixturevalue("elpv_installed")  # installed by make test: fail, not skip
    elif name == "load_fashion_mnist":
        skip_without_fashion_data()  # a Debian package or a manual download
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(docstring_examples()[name])
    assert result.attempted > 0 and result.failed == 0
