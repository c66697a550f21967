"""The Examples sections of public docstrings run as written.

skt.datasets runs its own, in tests/test_datasets.py, where the one that
needs optional data skips with a reason.
"""

import doctest
import importlib

import pytest

MODULES = [
    "skt.images",
    "skt.extractor",
    "skt.cache",
    "skt.pooling",
    "skt.backbones._resolve",
    "skt.backbones._layers",
    "skt.backbones.efficientnet_lite",
    "skt.benchmark",
    "skt.finetune",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
