"""skt: pretrained CNNs as scikit-learn estimators.

``FeatureExtractor`` turns chosen layers of a pretrained network into a feature
matrix for any scikit-learn head; ``FineTuneClassifier`` fine-tunes the network
end to end behind the same fit / predict interface.
"""

from skt._version import __version__
from skt.backbones import WeightsNotFoundError, list_backbones, list_layers
from skt.cache import cache_info, clear_cache
from skt.extractor import FeatureExtractor
from skt.finetune import FineTuneClassifier, list_stages
from skt.images import load_image_folder

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
    "load_image_folder",
]
