"""The Examples sections of every module's docstrings run as written.

skt.datasets runs its own, in tests/test_datasets.py, where the one that
needs optional data skips with a reason.
"""

import doctest
import importlib
import pkgutil

import pytest

import skt

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(skt.__path__, "skt.")
    if info.name not in ("skt.datasets", "skt.__main__")
)
# Modules whose public functions or classes promise examples: a lost Examples
# section fails here instead of silently running nothing.
WITH_EXAMPLES = {
    "skt.backbones._registry", "skt.backbones._resolve", "skt.backbones._layers",
    "skt.backbones._shapes",
    "skt.backbones.efficientnet_lite", "skt.bench", "skt.bench._curve", "skt.bench._inputs",
    "skt.bench._machine",
    "skt.bench._rows", "skt.bench._run", "skt.cache", "skt.extractor", "skt.finetune",
    "skt.images._folder", "skt.images._preprocess", "skt.images._validate", "skt.persist",
    "skt.pooling",
    "skt.training._callbacks", "skt.training._freeze", "skt.training._optim",
    "skt.da", "skt.extract._quantize", "skt.transferability",
}


def test_the_list_of_modules_with_examples_is_current():
    assert WITH_EXAMPLES <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0 or name not in WITH_EXAMPLES
