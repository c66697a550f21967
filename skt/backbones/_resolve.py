"""Turn ``backbone=`` and ``weights=`` into an ``nn.Module`` and its preprocessing."""

from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tvm
from sklearn.utils import check_random_state
from torch import nn
from torchvision.models import WeightsEnum

from skt.backbones._config import Preprocessing, resolve_preprocessing
from skt.backbones.efficientnet_lite import (
    LITE_VARIANTS,
    convert_lite_state_dict,
    efficientnet_lite,
    lite_weights_path,
)

__all__ = [
    "Backbone",
    "WeightsNotFoundError",
    "classifier_name",
    "list_backbones",
    "resolve_backbone",
    "weights_available_offline",
]

_STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are neither on disk nor downloadable."""


@dataclass
class Backbone:
    """A resolved backbone: the classification network and how to feed it.

    Attributes
    ----------
    model : nn.Module
        The full classification network on the CPU, in eval mode.
    name : str
        Registry name (``"resnet18"``) or, for a user module, its class name.
    weights : str or None
        What was loaded: a weights enum (``"ResNet18_Weights.IMAGENET1K_V1"``),
        ``"path:<file>"``, ``"module"`` for a user module, or None (random init).
    preprocessing : Preprocessing
        Resize, crop and normalisation the weights expect (after overrides).
    rebuildable : bool
        True when ``name`` and ``weights`` alone rebuild the same network, so a
        pickle need not carry the weights.
    """

    model: nn.Module
    name: str
    weights: str | None
    preprocessing: Preprocessing
    rebuildable: bool


def list_backbones() -> list[str]:
    """Names accepted by ``backbone=``: torchvision classifiers and EfficientNet-Lite.

    Examples
    --------
    >>> from skt import list_backbones
    >>> "resnet18" in list_backbones() and "efficientnet_lite0" in list_backbones()
    True
    """
    return sorted(set(tvm.list_models(module=tvm)) | set(LITE_VARIANTS))


def _unknown_backbone(name: str) -> ValueError:
    close = difflib.get_close_matches(name, list_backbones(), n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return ValueError(
        f"Unknown backbone {name!r}.{hint} skt.list_backbones() lists the valid names; "
        "an nn.Module instance is accepted too."
    )


def _is_path(weights: Any) -> bool:
    if isinstance(weights, os.PathLike):
        return True
    return isinstance(weights, str) and (
        os.sep in weights or "/" in weights or weights.lower().endswith(_STATE_DICT_SUFFIXES)
        or os.path.isfile(weights)
    )


def _torchvision_preprocessing(weights: WeightsEnum | None) -> Preprocessing | None:
    if weights is None:
        return None
    preset = weights.transforms()
    return Preprocessing(
        crop_size=int(preset.crop_size[0]),
        resize_size=int(preset.resize_size[0]),
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        interpolation=preset.interpolation.value,
    )


def _lite_preprocessing(name: str) -> Preprocessing:
    size = LITE_VARIANTS[name].image_size
    # TensorFlow's EfficientNet evaluation: centre crop with 32 px of padding, bicubic.
    return Preprocessing(crop_size=size, resize_size=size + 32, mean=(0.5,) * 3,
                         std=(0.5,) * 3, interpolation="bicubic")


def _weights_enum(name: str, weights: str | WeightsEnum) -> WeightsEnum:
    enum_cls = tvm.get_model_weights(name)
    if isinstance(weights, WeightsEnum):
        if not isinstance(weights, enum_cls):
            raise ValueError(f"{weights} are not weights of {name!r}; valid: "
                             f"{[w.name for w in enum_cls]}.")
        return weights
    member = weights.rsplit(".", 1)[-1]
    if member == "DEFAULT":
        return enum_cls.DEFAULT
    if member not in enum_cls.__members__:
        raise ValueError(
            f"Unknown weights {weights!r} for backbone {name!r}. Valid: "
            f"{['DEFAULT', *enum_cls.__members__]}, None for random init, or a path to a "
            "state-dict file."
        )
    return enum_cls[member]


def _hub_file(weights: WeightsEnum) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def weights_available_offline(name: str) -> bool:
    """Whether ``name``'s default pretrained weights load without a download."""
    if name in LITE_VARIANTS:
        try:
            lite_weights_path(name)
        except FileNotFoundError:
            return False
        return True
    return _hub_file(tvm.get_model_weights(name).DEFAULT).is_file()


def _download_torchvision(name: str, weights: WeightsEnum) -> nn.Module:
    try:
        return tvm.get_model(name, weights=weights)
    except OSError as exc:  # URLError, timeouts and refused connections are all OSError
        target = _hub_file(weights)
        raise WeightsNotFoundError(
            f"The weights {weights} of backbone {name!r} are not in the torch hub cache and "
            f"could not be downloaded ({exc}). The cache folder is {target.parent} (set "
            f"TORCH_HOME to move it). On a machine with internet access, download "
            f"{weights.url} and place the file at {target}; or pass weights='path/to/file.pth' "
            "or weights=None (random init)."
        ) from exc


def _load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights={str(path)!r}: no such file. Pass the path of a "
                                "state-dict file, a weights name such as 'DEFAULT', or None.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"weights={str(path)!r} could not be read as a state dict "
                         f"({exc}). Save it with torch.save(model.state_dict(), path).") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"weights={str(path)!r} does not hold a state dict (a mapping of "
                         "parameter names to tensors).")
    return state


def classifier_name(model: nn.Module) -> str | None:
    """Name of the classifier: the last ``nn.Linear`` in ``named_modules`` order."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], label: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"The state dict in {label} does not fit this backbone: {exc}") from exc


def _build(name: str, num_classes: int | None = None) -> nn.Module:
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if name in LITE_VARIANTS:
        return efficientnet_lite(name, weights=None, **kwargs)
    return tvm.get_model(name, weights=None, **kwargs)


def _build_from_file(name: str, path: str | os.PathLike) -> nn.Module:
    state = _load_state_dict_file(path)
    if name in LITE_VARIANTS:
        state = convert_lite_state_dict(state)
    model = _build(name)
    head = classifier_name(model)
    if head is not None:
        # A fine-tuned checkpoint may have its own number of classes.
        weight = state.get(f"{head}.weight")
        if weight is not None and weight.shape[0] != model.get_submodule(head).out_features:
            model = _build(name, num_classes=int(weight.shape[0]))
    _load_into(model, state, f"weights={str(path)!r}")
    return model


def _random_init(name: str, random_state: Any) -> nn.Module:
    if random_state is None:
        return _build(name)
    seed = int(check_random_state(random_state).randint(0, 2**31 - 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(name)


def resolve_backbone(
    backbone: str | nn.Module,
    weights: str | os.PathLike | WeightsEnum | None = "DEFAULT",
    *,
    image_size: int | None = None,
    mean: Any = None,
    std: Any = None,
    random_state: Any = None,
) -> Backbone:
    """Build the network for ``backbone`` with ``weights`` and its preprocessing.

    Parameters
    ----------
    backbone : str or nn.Module
        A name from :func:`list_backbones`, or a module the user built (which is
        deep-copied, never modified).
    weights : {"DEFAULT"}, str, path, WeightsEnum or None
        ``"DEFAULT"`` or an enum member name (``"IMAGENET1K_V2"``) for
        pretrained weights, a path to a state-dict file, or None for random
        initialisation. For a user module, None and ``"DEFAULT"`` both mean
        "as given".
    image_size : int, optional
        Overrides the crop size of the weights' preprocessing.
    mean, std : float or sequence of 3 floats, optional
        Override the normalisation (a user module gets ImageNet's by default).
    random_state : int, RandomState or None
        Seeds random initialisation (``weights=None``) so that it is repeatable.

    Returns
    -------
    Backbone
    """
    if isinstance(backbone, nn.Module):
        model = copy.deepcopy(backbone)
        if weights is not None and not (isinstance(weights, str) and weights == "DEFAULT"):
            if not _is_path(weights):
                raise ValueError(
                    f"weights={weights!r} cannot be applied to a user module; pass a path to "
                    "a state-dict file, or None to use the module as given."
                )
            _load_into(model, _load_state_dict_file(weights), f"weights={str(weights)!r}")
        label = "module" if weights in (None, "DEFAULT") else f"path:{os.fspath(weights)}"
        return Backbone(model.eval(), type(backbone).__name__, label,
                        resolve_preprocessing(None, image_size, mean, std), rebuildable=False)

    if not isinstance(backbone, str) or backbone not in list_backbones():
        raise _unknown_backbone(str(backbone))
    name = backbone
    if name in LITE_VARIANTS:
        base = _lite_preprocessing(name)
    else:
        default = tvm.get_model_weights(name).DEFAULT
        base = _torchvision_preprocessing(default)

    if weights is None:
        model, label = _random_init(name, random_state), None
        rebuildable = isinstance(random_state, int)
    elif _is_path(weights):
        model, label = _build_from_file(name, weights), f"path:{os.fspath(weights)}"
        rebuildable = False
    elif name in LITE_VARIANTS:
        if str(weights).rsplit(".", 1)[-1] not in ("DEFAULT", "IMAGENET1K_V1"):
            raise ValueError(f"Unknown weights {weights!r} for backbone {name!r}. Valid: "
                             "['DEFAULT', 'IMAGENET1K_V1'], None, or a path to a state-dict file.")
        try:
            model = efficientnet_lite(name, weights="DEFAULT")
        except FileNotFoundError as exc:
            raise WeightsNotFoundError(str(exc)) from exc
        label, rebuildable = f"{name}.IMAGENET1K_V1", True
    else:
        enum = _weights_enum(name, weights)
        model, label, rebuildable = _download_torchvision(name, enum), str(enum), True
        base = _torchvision_preprocessing(enum)
    preprocessing = resolve_preprocessing(base, image_size, mean, std)
    return Backbone(model.eval(), name, label, preprocessing, rebuildable)
