"""Shared fixtures: seeds, tiny synthetic images, temporary image folders."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _graph_cache(tmp_path_factory):
    """Exported ONNX graphs go to a folder of this test session, shared by its subprocesses."""
    os.environ["SKT_CACHE_DIR"] = str(tmp_path_factory.mktemp("skt-cache"))

# scikit-learn's checks that need no tabular data: image estimators run these by name,
# since parametrize_with_checks skips everything once the tags say "not a 2-D array".
DATA_FREE_CHECKS = [
    "check_no_attributes_set_in_init",
    "check_estimator_cloneable",
    "check_estimator_repr",
    "check_parameters_default_constructible",
    "check_get_params_invariance",
    "check_set_params",
    "check_do_not_raise_errors_in_init_or_set_params",
    "check_mixin_order",
    "check_valid_tag_types",
]

# Small and fast: a random-init ResNet-18 on 32 px crops.
TINY = {"backbone": "resnet18", "weights": None, "image_size": 32, "random_state": 0,
        "engine": "torch"}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks run faster on one torch thread than split over two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def images(rng):
    """Eight 40x48 RGB uint8 images."""
    return rng.integers(0, 256, size=(8, 40, 48, 3), dtype=np.uint8)


@pytest.fixture
def image_files(tmp_path, images):
    """The ``images`` fixture saved as PNG files; returns their paths."""
    paths = []
    for i, array in enumerate(images):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(array).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def image_folder(tmp_path, rng):
    """root/<class>/<image>.png with two classes of six images that differ in brightness."""
    root = tmp_path / "folder"
    for label, low in (("bright", 150), ("dark", 0)):
        (root / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(low, low + 100, size=(36, 36, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def require(module: str, install: str):
    """Import a dependency that ``make test`` installs.

    Missing means a broken set-up, so the test fails and says how to fix it
    rather than skipping in silence.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{module} is not installed: {install} (make test installs it).",
                    pytrace=False)


@pytest.fixture
def elpv_installed():
    return require("elpv_dataset", "pip install elpv-dataset")


def foolbox_imagenet_files() -> list[Path]:
    """The 20 labelled ImageNet JPEGs shipped in the foolbox wheel (class id in the name)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return sorted(folder.glob("imagenet_*.jpg"))
