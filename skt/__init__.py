"""skt: pretrained CNNs as scikit-learn estimators.

``FeatureExtractor`` turns chosen layers of a pretrained network into a feature
matrix for any scikit-learn head; ``FineTuneClassifier`` fine-tunes the network
end to end behind the same fit / predict interface.

The names below load on first use (PEP 562), so ``import skt`` and the
``skt`` command's ``--help`` do not wait for torch and scikit-learn.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from skt._version import __version__

if TYPE_CHECKING:
    from skt.backbones import WeightsNotFoundError, list_backbones, list_layers, list_stages
    from skt.cache import cache_info, clear_cache
    from skt.extractor import FeatureExtractor
    from skt.finetune import FineTuneClassifier
    from skt.images import load_image_folder
    from skt.persist import load, save
    from skt.transferability import make_transferability_scorer, rank_backbones

_LAZY = {
    "FeatureExtractor": "skt.extractor",
    "FineTuneClassifier": "skt.finetune",
    "WeightsNotFoundError": "skt.backbones",
    "cache_info": "skt.cache",
    "clear_cache": "skt.cache",
    "list_backbones": "skt.backbones",
    "list_layers": "skt.backbones",
    "list_stages": "skt.backbones",
    "load": "skt.persist",
    "load_image_folder": "skt.images",
    "make_transferability_scorer": "skt.transferability",
    "rank_backbones": "skt.transferability",
    "save": "skt.persist",
}

__all__ = [
    "FeatureExtractor",
    "FineTuneClassifier",
    "WeightsNotFoundError",
    "__version__",
    "cache_info",
    "clear_cache",
    "list_backbones",
    "list_layers",
    "list_stages",
    "load",
    "load_image_folder",
    "make_transferability_scorer",
    "rank_backbones",
    "save",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'skt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
