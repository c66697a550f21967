"""Fitted models in one file, without pickle: :func:`save` and :func:`load`.

``skt.save(model, path)`` writes a fitted :class:`skt.FeatureExtractor`,
:class:`skt.FineTuneClassifier`, or any scikit-learn pipeline, search or
meta-estimator holding them, to a zip archive; ``skt.load(path)`` reads it
back. Nothing in the file is unpickled, and no code comes from it.

What the archive holds (format version 1)::

    skt.json                    {"format": "skt", "version": 1, versions, "root", "estimators"}
    estimators/<i>.safetensors  the network weights of skt estimator <i>, if any
    tree.skops                  the scikit-learn part, if the model is not a bare estimator

- Each skt estimator is an entry of ``estimators`` in ``skt.json``: its class
  name, its constructor parameters and its fitted attributes as JSON.
  Arrays (``classes_``), tuples, paths, devices, weights names, random
  states and skt's preprocessing and layout records are tagged JSON values
  (``{"$tuple": [...]}``); a ``joblib.Memory`` ``cache`` is saved as its
  folder. Other Python objects, such as ``callbacks``, are refused with an
  error naming the parameter.
- Network weights are safetensors. A ``FeatureExtractor`` whose weights are
  rebuilt by name (pretrained weights, or ``weights=None`` with an int
  ``random_state``) stores only their hash, as its pickles do: ``load``
  rebuilds them (so pretrained weights must be on that machine, or
  downloadable) and checks the hash. Other networks (a fine-tuned model, a
  random initialisation without a seed, weights from a file) are stored as
  state dicts, with a hash checked after loading. The architecture is never
  read from the file: ``load`` builds it from the estimator's parameters
  (``backbone`` and the number of classes) and loads the state dict strictly.
- A backbone passed as an ``nn.Module`` is code, which a file cannot carry
  safely: its weights are saved, and ``load`` needs a module of the same
  class and architecture, ``skt.load(path, modules={"TinyNet": TinyNet()})``,
  keyed by class name, whose weights are replaced by the saved ones.
- The scikit-learn part is written by ``skops.io``, with each skt estimator
  replaced by a placeholder. ``load`` asks skops for the types in it that
  skops does not trust by default, refuses any that are not on skt's list
  (:data:`TRUSTED_TYPES`: fitted trees, neighbour indexes, cross-validation
  splitters, scorers and their metrics) or in ``trusted=``, naming them,
  and only then lets skops build the objects.

Trust: JSON, safetensors and skops (with its types audited as above) never
run code from a file; a file
from an untrusted source can at worst fail to load (or load a model that
predicts badly). A loaded estimator uses the parameters it was saved with,
``cache`` and ``checkpoint`` folders included. Pickle and joblib files of
fitted models execute code when loaded: as scikit-learn's documentation
says, load those only from sources you trust. ``skt.load`` never unpickles.

Both functions need the ``safe`` extra: ``pip install "skt[safe]"``.

Examples
--------
>>> import os, tempfile
>>> import numpy as np
>>> import skt
>>> X = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
>>> extractor = skt.FeatureExtractor("resnet18", weights=None, image_size=32,
...                                  engine="torch", random_state=0).fit(X)
>>> path = os.path.join(tempfile.mkdtemp(), "extractor.skt")
>>> skt.save(extractor, path)
>>> np.array_equal(skt.load(path).transform(X), extractor.transform(X))
True
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import types
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn
import torch
from torch import nn
from torchvision.models import WeightsEnum, get_weight

from skt._base import ImageEstimatorMixin
from skt._utils import atomic_open, expand_path
from skt._version import __version__
from skt.backbones import resolve_backbone
from skt.cache import fingerprint_module
from skt.extractor import FeatureExtractor
from skt.finetune import FineTuneClassifier
from skt.images import Preprocessing
from skt.pooling import LayerLayout

__all__ = ["FORMAT_VERSION", "TRUSTED_TYPES", "load", "save"]

FORMAT_VERSION = 1
"""Version of the archive layout; :func:`load` reads this version only."""

_MANIFEST = "skt.json"
_TREE = "tree.skops"
_ESTIMATORS = {cls.__name__: cls for cls in (FeatureExtractor, FineTuneClassifier)}
_RECORDS = {cls.__name__: cls for cls in (Preprocessing, LayerLayout)}

_DISTANCES = ("Euclidean", "SEuclidean", "Manhattan", "Chebyshev", "Minkowski", "Mahalanobis",
              "Canberra", "BrayCurtis", "Haversine", "Hamming", "Jaccard", "Dice", "Matching")
_SPLITTERS = ("KFold", "StratifiedKFold", "GroupKFold", "StratifiedGroupKFold", "ShuffleSplit",
              "StratifiedShuffleSplit", "GroupShuffleSplit", "RepeatedKFold",
              "RepeatedStratifiedKFold", "LeaveOneOut", "LeaveOneGroupOut", "PredefinedSplit",
              "TimeSeriesSplit", "_CVIterableWrapper")
_METRICS = {
    "_classification": ("accuracy_score", "balanced_accuracy_score", "f1_score",
                        "precision_score", "recall_score", "jaccard_score", "log_loss",
                        "matthews_corrcoef", "brier_score_loss"),
    "_ranking": ("roc_auc_score", "average_precision_score", "top_k_accuracy_score"),
    "_regression": ("r2_score", "mean_squared_error", "mean_absolute_error"),
}
TRUSTED_TYPES = frozenset({
    "skt.persist._Slot",
    "sklearn.utils._bunch.Bunch",
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.metrics._scorer._Scorer",
    "sklearn.metrics._scorer._PassthroughScorer",
    "sklearn.metrics._scorer._MultimetricScorer",
    *(f"sklearn.metrics._dist_metrics.{name}Distance{bits}"
      for name in _DISTANCES for bits in (64, 32)),
    *(f"sklearn.model_selection._split.{name}" for name in _SPLITTERS),
    *(f"sklearn.metrics.{module}.{name}" for module, names in _METRICS.items()
      for name in names),
})
"""Types :func:`load` accepts in the scikit-learn part beyond those skops trusts by default.

Parts of fitted scikit-learn models that hold only data: trees, neighbour
indexes, optimiser states, calibrators, scorers and the metric functions
behind them, cross-validation splitters, and the placeholder that marks
where an skt estimator stands. Code-bearing types (``builtins.eval``,
``os.system``, classes from other packages) are never on it.
"""


_SKOPS_MIN = (0, 12)


def _safe_packages() -> tuple[Any, Any]:
    try:
        import safetensors.torch
        import skops
        import skops.io
    except ImportError as exc:
        raise ImportError(f"skt.save and skt.load need skops and safetensors ({exc}). "
                          'Install them with: pip install "skt[safe]"') from exc
    version = tuple(int(part) for part in re.findall(r"\d+", skops.__version__)[:2])
    if version < _SKOPS_MIN:
        raise ImportError(f"skops {skops.__version__} is too old for skt.load: releases before "
                          "0.12 can be made to run code from a file (CVE-2025-54412). Upgrade "
                          'it: pip install "skt[safe]" --upgrade')
    return skops.io, safetensors.torch


class _Slot:
    """Where skt estimator number ``index`` stands in the scikit-learn part."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"_Slot({self.index})"


# ------------------------------------------------------------ object trees --

_LEAVES = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
           types.ModuleType)


def _substitute(obj: Any, swap: Callable[[Any], Any], memo: dict[int, Any]) -> Any:
    """``obj`` with every part for which ``swap`` returns a replacement (not None) replaced.

    Lists, tuples, dicts, object arrays and objects' ``__dict__`` are walked;
    those with a replaced part below them are copied (shallowly), the rest
    shared, so ``obj`` itself never changes.
    """
    if id(obj) in memo:
        return memo[id(obj)]
    memo[id(obj)] = obj  # a reference cycle back to obj sees it unchanged
    new = swap(obj)
    if new is None:
        new = _rebuild(obj, lambda part: _substitute(part, swap, memo))
    memo[id(obj)] = new
    return new


def _rebuild(obj: Any, visit: Callable[[Any], Any]) -> Any:
    if isinstance(obj, list | tuple):
        parts = [visit(part) for part in obj]
        if all(new is old for new, old in zip(parts, obj, strict=True)):
            return obj
        if isinstance(obj, list):
            new = copy.copy(obj)
            new[:] = parts
            return new
        return type(obj)(*parts) if hasattr(obj, "_fields") else type(obj)(parts)
    if isinstance(obj, dict):
        changed = {key: new for key, value in obj.items() if (new := visit(value)) is not value}
        new = copy.copy(obj) if changed else obj
        new.update(changed)
        return new
    if isinstance(obj, np.ndarray):
        if obj.dtype != object:
            return obj
        changed = {i: new for i, value in enumerate(obj.flat) if (new := visit(value)) is not value}
        new = obj.copy() if changed else obj
        for i, value in changed.items():
            new.flat[i] = value
        return new
    state = getattr(obj, "__dict__", None)
    if not isinstance(state, dict) or isinstance(obj, _LEAVES):
        return obj
    changed = {key: new for key, value in state.items() if (new := visit(value)) is not value}
    if not changed:
        return obj
    new = copy.copy(obj)
    vars(new).update(changed)
    return new


# ------------------------------------------------------------- JSON values --

def _encode(value: Any, where: str) -> Any:
    """``value`` as JSON, other types tagged with a one-key object, ``{"$tuple": [...]}``.

    ``where`` names the value in the error for one that cannot be stored.
    """
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, np.generic):
        return {"$scalar": [value.dtype.str, value.item()]}
    if isinstance(value, list):
        return [_encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [_encode(item, f"{where}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("$") for key in value):
            return {key: _encode(item, f"{where}[{key!r}]") for key, item in value.items()}
        return {"$dict": [[_encode(key, where), _encode(item, f"{where}[{key!r}]")]
                          for key, item in value.items()]}
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufUO":
        return {"$ndarray": {"dtype": value.dtype.str, "shape": list(value.shape),
                             "data": [_encode(item, where) for item in value.ravel().tolist()]}}
    if isinstance(value, os.PathLike):
        return {"$path": os.fspath(value)}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if isinstance(value, WeightsEnum):
        return {"$weights": f"{type(value).__name__}.{value.name}"}
    if isinstance(value, np.random.RandomState):
        name, keys, position, has_gauss, gauss = value.get_state()
        return {"$random_state": [name, keys.tolist(), position, has_gauss, gauss]}
    if isinstance(value, joblib.Memory):  # skt reads only its folder
        return _encode(value.location, where)
    if type(value) in _RECORDS.values():
        return {"$record": [type(value).__name__,
                            _encode(dataclasses.asdict(value), where)]}
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which "
                   "skt.save cannot store (it stores JSON values, arrays, tuples, paths, "
                   "devices, weights names and random states). If it only matters to fit, "
                   "set it to None with set_params before saving and set it again after "
                   "loading.")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(item) for item in value]
    if not isinstance(value, dict):
        return value
    tags = [key for key in value if key.startswith("$")]
    if not tags:
        return {key: _decode(item) for key, item in value.items()}
    if len(value) != 1 or tags[0] not in _DECODERS:
        raise ValueError(f"unknown tagged value {sorted(value)}")
    return _DECODERS[tags[0]](value[tags[0]])


def _decode_array(spec: dict) -> np.ndarray:
    dtype = np.dtype(spec["dtype"])
    if dtype.kind not in "biufUO":
        raise ValueError(f"arrays of dtype {dtype} are not stored by skt.save")
    if dtype.kind == "U":  # no wider than its longest string: a crafted width cannot eat memory
        width = max((len(item) for item in spec["data"] if isinstance(item, str)), default=1)
        if dtype.itemsize > 4 * max(width, 1):
            raise ValueError(f"an array of dtype {dtype} holds strings of at most {width} "
                             "characters; the file was not written by skt.save")
    array = np.empty(len(spec["data"]), dtype=dtype)
    array[:] = [_decode(item) for item in spec["data"]]
    return array.reshape(spec["shape"])


def _decode_random_state(state: list) -> np.random.RandomState:
    name, keys, position, has_gauss, gauss = state
    random_state = np.random.RandomState()
    random_state.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    return random_state


def _decode_record(spec: list) -> Any:
    name, fields = spec
    if name not in _RECORDS:
        raise ValueError(f"unknown record type {name!r}")
    return _RECORDS[name](**_decode(fields))


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "$tuple": lambda items: tuple(_decode(items)),
    "$dict": lambda pairs: {_decode(key): _decode(item) for key, item in pairs},
    "$ndarray": _decode_array,
    "$scalar": lambda spec: np.dtype(spec[0]).type(spec[1]),
    "$path": Path,
    "$device": torch.device,
    "$weights": get_weight,
    "$random_state": _decode_random_state,
    "$record": _decode_record,
}


# ------------------------------------------------------------ skt estimators --

def _encode_module(module: nn.Module, prefix: str, tensors: dict, names: dict) -> dict:
    """Put ``module``'s state dict into ``tensors`` (once per distinct weights)."""
    fingerprint = fingerprint_module(module)
    if fingerprint not in names:
        names[fingerprint] = prefix
        tensors.update({f"{prefix}.{key}": value.detach().cpu().contiguous().clone()
                        for key, value in module.state_dict().items()})
    return {"$module": {"class": type(module).__name__, "tensors": names[fingerprint],
                        "fingerprint": fingerprint}}


def _store_estimator(estimator: Any) -> tuple[dict, dict[str, torch.Tensor]]:
    """The ``skt.json`` entry of one skt estimator, and its tensors."""
    if type(estimator) not in _ESTIMATORS.values():
        raise TypeError(f"skt.save stores skt's own estimators ({', '.join(_ESTIMATORS)}), "
                        f"not {type(estimator).__module__}.{type(estimator).__qualname__}, "
                        "a subclass: save its scikit-learn parts with skops.io, or refit it.")
    params = estimator.get_params(deep=False)
    state = estimator.__getstate__()
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}

    def encode(name: str, value: Any, kind: str) -> Any:
        if isinstance(value, nn.Module):
            return _encode_module(value, name, tensors, names)
        return _encode(value, f"{type(estimator).__name__} {kind} {name!r}")

    entry = {
        "class": type(estimator).__name__,
        "params": {name: encode(name, value, "parameter") for name, value in params.items()},
        "attributes": {name: encode(name, value, "attribute") for name, value in state.items()
                       if name not in params},
    }
    return entry, tensors


def _network_for(estimator: Any, classifier: str | None,
                 state: dict[str, torch.Tensor]) -> nn.Module:
    """The fitted network's architecture, from the estimator's parameters alone.

    The backbone with random weights, its linear classifier given the stored
    number of outputs (one per class of a fine-tuned head, or those of a
    state-dict file); everything else, its inputs included, is the backbone's.
    """
    model = resolve_backbone(estimator.backbone, None, random_state=0).model
    weight = None if classifier is None else state.get(f"{classifier}.weight")
    if weight is not None and weight.ndim == 2:
        head = model.get_submodule(classifier)
        if isinstance(head, nn.Linear) and head.out_features != weight.shape[0]:
            with torch.random.fork_rng(devices=[]):
                model.set_submodule(classifier, nn.Linear(
                    head.in_features, weight.shape[0], bias=head.bias is not None))
    return model


class _Loader:
    """Rebuilds the skt estimators of one archive."""

    def __init__(self, archive: zipfile.ZipFile, label: str, modules: Mapping[str, nn.Module],
                 safetensors_torch: Any) -> None:
        self.archive = archive
        self.label = label
        self.modules = modules
        self.safetensors = safetensors_torch

    def error(self, index: int, message: str) -> ValueError:
        return ValueError(f"{self.label}: skt estimator {index}: {message}")

    def estimator(self, index: int, entry: Any) -> Any:
        cls, params, attributes = self.check(index, entry)
        tensors = self.tensors(index)
        estimator = cls(**{name: self.parameter(index, name, value, tensors)
                           for name, value in params.items()})
        state = {name: self.decode(index, name, value) for name, value in attributes.items()
                 if not _is_module(value)}
        for name, value in attributes.items():
            if _is_module(value):  # the fitted network: its architecture from the parameters
                weights = _prefixed(tensors, value["$module"].get("tensors"))
                network = _network_for(estimator, state.get("_classifier"), weights)
                state[name] = self.module(index, name, value, tensors, network)
        estimator.__setstate__(state)
        if isinstance(estimator, FeatureExtractor) and getattr(estimator, "_rebuildable", False):
            estimator._get_model()  # rebuild the weights by name now, and check their hash
        model = getattr(estimator, "model_", None)
        if model is not None and hasattr(estimator, "_fingerprint") and (
                fingerprint_module(model) != estimator._fingerprint):
            # the hash keys runtimes and feature caches: a false one would serve other weights
            raise self.error(index, "the weights' hash recorded in the file is not the hash of "
                                    "its weights; the file is damaged or was not written by "
                                    "skt.save")
        return estimator

    def check(self, index: int, entry: Any) -> tuple[type, dict, dict]:
        """The class, parameters and attributes of an entry, all names checked."""
        if not (isinstance(entry, dict) and set(entry) == {"class", "params", "attributes"}
                and isinstance(entry["params"], dict) and isinstance(entry["attributes"], dict)):
            raise self.error(index, "an entry needs exactly a 'class', a 'params' object and "
                                    "an 'attributes' object.")
        cls = _ESTIMATORS.get(entry["class"]) if isinstance(entry["class"], str) else None
        if cls is None:
            raise self.error(index, f"unknown estimator class {entry['class']!r}; skt.load "
                                    f"builds {', '.join(_ESTIMATORS)}.")
        valid = cls().get_params(deep=False)
        unknown = sorted(set(entry["params"]) - set(valid))
        if unknown:
            raise self.error(index, f"unknown {cls.__name__} parameters {unknown}; the file "
                                    "was written by another version of skt, or altered.")
        for name in entry["attributes"]:
            # A fitted attribute never shadows a method or class attribute, nor a parameter.
            if not name.isidentifier() or name.startswith("__") or hasattr(cls, name) \
                    or name in valid:
                raise self.error(index, f"{name!r} is not a fitted attribute a "
                                        f"{cls.__name__} can have.")
        return cls, entry["params"], entry["attributes"]

    def tensors(self, index: int) -> dict[str, torch.Tensor]:
        name = f"estimators/{index}.safetensors"
        if name not in self.archive.namelist():
            return {}
        try:
            return self.safetensors.load(self.archive.read(name))
        except Exception as exc:
            raise self.error(index, f"{name} is not a readable safetensors file ({exc}).") from exc

    def decode(self, index: int, name: str, value: Any) -> Any:
        try:
            return _decode(value)
        except Exception as exc:
            raise self.error(index, f"{name!r} holds an invalid value ({exc}).") from exc

    def parameter(self, index: int, name: str, value: Any, tensors: dict) -> Any:
        if not _is_module(value):
            return self.decode(index, name, value)
        kind = value["$module"].get("class")
        given = self.modules.get(kind)
        if not isinstance(given, nn.Module):
            raise self.error(index, f"its {name} is a user module of class {kind!r}, whose "
                                    "code a file cannot carry. Pass a module of the same "
                                    f"architecture: skt.load(path, modules={{{kind!r}: "
                                    "<module>}); its weights are replaced by the saved ones.")
        return self.module(index, name, value, tensors, copy.deepcopy(given))

    def module(self, index: int, name: str, value: dict, tensors: dict,
               network: nn.Module) -> nn.Module:
        """``network`` given the saved weights: every tensor, each of the right shape."""
        spec = value["$module"]
        try:
            network.load_state_dict(_prefixed(tensors, spec.get("tensors")), strict=True)
        except RuntimeError as exc:
            raise self.error(index, f"the saved weights of {name} do not fit the "
                                    f"{type(network).__name__} built from its parameters: "
                                    f"{exc}") from exc
        if fingerprint_module(network) != spec.get("fingerprint"):
            raise self.error(index, f"the weights of {name} differ from those that were "
                                    "saved (their hash does not match): the file is damaged "
                                    "or altered, or the module passed for it is of another "
                                    "class.")
        return network.eval()


def _is_module(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"$module"} \
        and isinstance(value["$module"], dict)


def _prefixed(tensors: dict[str, torch.Tensor], prefix: Any) -> dict[str, torch.Tensor]:
    start = f"{prefix}."
    return {key[len(start):]: value for key, value in tensors.items() if key.startswith(start)}


# ------------------------------------------------------------------ archive --

def _check_trusted(untrusted: Iterable[str], trusted: Iterable[str]) -> list[str]:
    """The types of a skops file that neither skops, :data:`TRUSTED_TYPES` nor the caller trust."""
    return sorted(set(untrusted) - TRUSTED_TYPES - set(trusted))


def save(estimator: Any, path: str | os.PathLike) -> None:
    """Write a fitted model to ``path`` without pickle.

    ``estimator`` is a :class:`skt.FeatureExtractor`, a
    :class:`skt.FineTuneClassifier`, or any scikit-learn object holding them
    (a ``Pipeline``, a ``GridSearchCV`` or its ``best_estimator_``, ...).
    The file is a zip archive of format version :data:`FORMAT_VERSION`:
    parameters and fitted attributes as JSON, network weights as
    safetensors, the scikit-learn part as a skops file (see :mod:`skt.persist`).
    ``estimator`` is not modified; the file is replaced only once complete.

    Parameters
    ----------
    estimator : object
        The model to save, fitted or not.
    path : str or path
        Where to write it, conventionally with the suffix ``.skt``.

    Raises
    ------
    TypeError
        A parameter or attribute of an skt estimator holds an object that
        cannot be stored without pickle (``callbacks``, say); the message names it.
    ImportError
        skops or safetensors are missing: ``pip install "skt[safe]"``.

    Warns
    -----
    UserWarning
        The scikit-learn part holds types that :func:`load` refuses unless
        they are passed to it as ``trusted``.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import skt
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.pipeline import make_pipeline
    >>> X = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    >>> y = [0, 1, 0, 1, 0, 1]
    >>> model = make_pipeline(skt.FeatureExtractor("resnet18", weights=None, image_size=32,
    ...                                            engine="torch", random_state=0),
    ...                       LogisticRegression()).fit(X, y)
    >>> path = os.path.join(tempfile.mkdtemp(), "model.skt")
    >>> skt.save(model, path)
    >>> skt.load(path).predict(X).tolist() == model.predict(X).tolist()
    True
    """
    skops_io, safetensors_torch = _safe_packages()
    found: list[Any] = []

    def swap(obj: Any) -> _Slot | None:
        if not isinstance(obj, ImageEstimatorMixin):
            return None
        found.append(obj)
        return _Slot(len(found) - 1)

    tree = _substitute(estimator, swap, {})
    stored = [_store_estimator(found_one) for found_one in found]
    manifest = {
        "format": "skt",
        "version": FORMAT_VERSION,
        "skt": __version__,
        "scikit-learn": sklearn.__version__,
        "torch": torch.__version__,
        "root": {"estimator": tree.index} if isinstance(tree, _Slot) else {"skops": _TREE},
        "estimators": [entry for entry, _ in stored],
    }
    members = {_MANIFEST: json.dumps(manifest, indent=1).encode()}
    members.update({f"estimators/{i}.safetensors": safetensors_torch.save(tensors)
                    for i, (_, tensors) in enumerate(stored) if tensors})
    if not isinstance(tree, _Slot):
        members[_TREE] = skops_io.dumps(tree)
        refused = _check_trusted(skops_io.get_untrusted_types(data=members[_TREE]), ())
        if refused:
            warnings.warn(f"{os.fspath(path)}: the scikit-learn part holds types that "
                          f"skt.load refuses unless you pass them as trusted={refused} "
                          "(check them first).", UserWarning, stacklevel=2)
    with atomic_open(expand_path(path)) as handle, zipfile.ZipFile(handle, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _read_manifest(archive: zipfile.ZipFile, label: str) -> dict:
    if _MANIFEST not in archive.namelist():
        raise ValueError(f"{label} is a zip archive but not an skt file: it has no {_MANIFEST}.")
    try:
        manifest = json.loads(archive.read(_MANIFEST))
    except ValueError as exc:
        raise ValueError(f"{label}: {_MANIFEST} is not valid JSON ({exc}).") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != "skt":
        raise ValueError(f"{label} is not an skt file: {_MANIFEST} does not say "
                         '"format": "skt".')
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{label} has skt file format version {manifest.get('version')!r}; "
                         f"skt {__version__} reads version {FORMAT_VERSION}. Load it with the "
                         f"skt version that wrote it (skt {manifest.get('skt')}) and save it "
                         "again, or refit the model.")
    expected = {"format", "version", "skt", "scikit-learn", "torch", "root", "estimators"}
    unknown = sorted(set(manifest) - expected)
    if unknown:
        raise ValueError(f"{label}: {_MANIFEST} has unknown keys {unknown}.")
    estimators, root = manifest.get("estimators"), manifest.get("root")
    if not isinstance(estimators, list) or not (
            root == {"skops": _TREE} or root in ({"estimator": i} for i in range(len(estimators)))):
        raise ValueError(f'{label}: {_MANIFEST} needs an "estimators" list and a "root" that '
                         f'is {{"skops": "{_TREE}"}} or {{"estimator": <index>}}.')
    if "skops" in root and _TREE not in archive.namelist():
        raise ValueError(f"{label}: {_TREE} is missing.")
    return manifest


def _open(path: str | os.PathLike) -> tuple[zipfile.ZipFile, str]:
    label = os.fspath(path)
    location = expand_path(path)
    if not zipfile.is_zipfile(location):
        if location.is_dir():
            raise IsADirectoryError(f"{label} is a folder; pass the path of a file that "
                                    "skt.save wrote.")
        if not location.is_file():
            raise FileNotFoundError(f"{label}: no such file.")
        raise ValueError(f"{label} is not an skt file: skt.save writes a zip archive holding "
                         f"{_MANIFEST}. If it is a pickle or joblib file, skt.load does not "
                         "open it, since unpickling runs code: load it with joblib.load only "
                         "if it comes from a source you trust.")
    return zipfile.ZipFile(location), label


def load(path: str | os.PathLike, *, modules: Mapping[str, nn.Module] | None = None,
         trusted: Iterable[str] = ()) -> Any:
    """Read a model written by :func:`save`, without pickle and without running its code.

    The scikit-learn part is audited before anything is built: types that
    skops does not trust by default, that are not on :data:`TRUSTED_TYPES`
    and not in ``trusted`` are refused, named in the error. skt estimators
    are rebuilt through their constructors; their networks are built from
    their parameters and given the saved weights (strictly: every tensor,
    with its shape), or, for a :class:`skt.FeatureExtractor` with weights
    rebuilt by name, rebuilt and checked against the saved hash.

    Parameters
    ----------
    path : str or path
        A file written by :func:`save`.
    modules : dict of str to nn.Module, optional
        For estimators whose ``backbone`` was an ``nn.Module``: a module of
        the same class and architecture per class name (the error for a
        missing one says which). Only its architecture is used: it is
        copied and given the saved weights.
    trusted : iterable of str, default=()
        Further type names (``"mypackage.MyTransformer"``) to accept in the
        scikit-learn part, after you have checked them: loading builds them.

    Returns
    -------
    estimator : object
        The model, as it was saved.

    Raises
    ------
    ValueError
        The file is not an skt file (a pickle or joblib file, say), has
        another format version, holds types that are not trusted, unknown
        parameters, or weights that do not fit the network.
    FileNotFoundError
        There is no file at ``path``.
    ImportError
        skops or safetensors are missing: ``pip install "skt[safe]"``.

    Examples
    --------
    >>> import os, pickle, tempfile
    >>> import skt
    >>> path = os.path.join(tempfile.mkdtemp(), "model.pkl")
    >>> with open(path, "wb") as handle:
    ...     pickle.dump({"not": "an skt file"}, handle)
    >>> skt.load(path)
    Traceback (most recent call last):
    ...
    ValueError: ...model.pkl is not an skt file: ...
    """
    names = None if isinstance(trusted, str | bool) else list(trusted)
    if names is None or not all(isinstance(name, str) for name in names):
        raise TypeError(f"trusted={trusted!r}: pass a list of type names such as "
                        '["mypackage.MyTransformer"], each checked by you.')
    skops_io, safetensors_torch = _safe_packages()
    archive, label = _open(path)
    with archive:
        manifest = _read_manifest(archive, label)
        untrusted = []
        if "skops" in manifest["root"]:
            data = archive.read(_TREE)
            try:
                untrusted = skops_io.get_untrusted_types(data=data)
            except Exception as exc:
                raise ValueError(f"{label}: {_TREE} is not a readable skops file ({exc}).") \
                    from exc
            refused = _check_trusted(untrusted, names)
            if refused:
                raise ValueError(f"{label} holds types that are not trusted: {refused}. "
                                 "Nothing was loaded. If you trust the file's source and "
                                 f"these types, pass trusted={refused}.")
        loader = _Loader(archive, label, modules or {}, safetensors_torch)
        estimators = [loader.estimator(i, entry) for i, entry in enumerate(manifest["estimators"])]
        if "estimator" in manifest["root"]:
            return estimators[manifest["root"]["estimator"]]
        tree = skops_io.loads(data, trusted=untrusted)

    def swap(obj: Any) -> Any:
        if not isinstance(obj, _Slot):
            return None
        index = getattr(obj, "index", None)
        if not (type(index) is int and 0 <= index < len(estimators)):
            raise ValueError(f"{label}: {_TREE} refers to skt estimator {index!r}, "
                             f"which is not among the {len(estimators)} in {_MANIFEST}.")
        return estimators[index]

    return _substitute(tree, swap, {})
