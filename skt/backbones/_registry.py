"""The backbone registry: one spec per family of named networks.

A :class:`BackboneFamily` says, for the names it owns, how to build the
network, how to load its pretrained weights, what preprocessing those
weights expect, and where its classifier and stages are (:class:`Layout`,
declared, never inferred). :func:`family_of` finds the family of a name;
:func:`register_family` adds one, ahead of the built-in families.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models import WeightsEnum

from skt.backbones import _timm as timm_family
from skt.backbones import efficientnet_lite as lite
from skt.backbones._families import Layout, torchvision_layout
from skt.images import Preprocessing

__all__ = ["BackboneFamily", "Layout", "WeightsNotFoundError", "family_of", "list_backbones",
           "register_family"]


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are neither on disk nor downloadable."""


@dataclass(frozen=True)
class BackboneFamily:
    """How a family of named backbones is built, loaded, preprocessed and laid out.

    Attributes
    ----------
    name : str
        The family, e.g. ``"torchvision"``.
    names : callable
        ``names()``: the backbone names it owns and :func:`list_backbones` lists.
    build : callable
        ``build(name, num_classes)``: a randomly initialised network
        (``num_classes=None`` for the family's default head).
    load : callable
        ``load(name, weights)``: the network with pretrained ``weights`` (a
        name such as ``"DEFAULT"``, or a family-specific object), and a label
        saying what was loaded. Raises :class:`WeightsNotFoundError` offline.
    preprocessing : callable
        ``preprocessing(name, weights)``: what those weights expect; with
        ``weights=None``, what the default weights expect.
    layout : callable
        ``layout(name)``: the :class:`Layout` (classifier and stages).
    weights_on_disk : callable
        ``weights_on_disk(name)``: whether the default weights load offline.
    convert_state_dict : callable
        Maps a state dict saved by the weights' publisher onto the network's keys.
    owns : callable or None
        ``owns(name)``: whether the family takes backbone ``name``; None for
        ``name in names()``. A family too large to list (timm's, by prefix)
        owns more names than ``names()`` lists.
    """

    name: str
    names: Callable[[], list[str]]
    build: Callable[[str, int | None], nn.Module]
    load: Callable[[str, Any], tuple[nn.Module, str]]
    preprocessing: Callable[[str, Any], Preprocessing]
    layout: Callable[[str], Layout]
    weights_on_disk: Callable[[str], bool]
    convert_state_dict: Callable[[dict], dict] = lambda state: state
    owns: Callable[[str], bool] | None = None

    def __post_init__(self) -> None:
        if self.owns is None:
            object.__setattr__(self, "owns", lambda name: name in self.names())


# ------------------------------------------------------------ torchvision --

def _torchvision_names() -> list[str]:
    return tvm.list_models(module=tvm)


def _torchvision_build(name: str, num_classes: int | None) -> nn.Module:
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return tvm.get_model(name, weights=None, **kwargs)


def _weights_enum(name: str, weights: str | WeightsEnum) -> WeightsEnum:
    enum_cls = tvm.get_model_weights(name)
    if isinstance(weights, WeightsEnum):
        if not isinstance(weights, enum_cls):
            raise ValueError(f"{weights} are not weights of {name!r}; valid: "
                             f"{[w.name for w in enum_cls]}.")
        return weights
    member = str(weights).rsplit(".", 1)[-1]
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


def _torchvision_load(name: str, weights: Any) -> tuple[nn.Module, str]:
    enum = _weights_enum(name, weights)
    try:
        return tvm.get_model(name, weights=enum), str(enum)
    except OSError as exc:  # URLError, timeouts and refused connections are all OSError
        target = _hub_file(enum)
        raise WeightsNotFoundError(
            f"The weights {enum} of backbone {name!r} are not in the torch hub cache and "
            f"could not be downloaded ({exc}). The cache folder is {target.parent} (set "
            f"TORCH_HOME to move it). On a machine with internet access, download "
            f"{enum.url} and place the file at {target}; or pass weights='path/to/file.pth' "
            "or weights=None (random init)."
        ) from exc


def _torchvision_preprocessing(name: str, weights: Any) -> Preprocessing:
    enum = _weights_enum(name, "DEFAULT" if weights is None else weights)
    preset = enum.transforms()
    return Preprocessing(
        crop_size=int(preset.crop_size[0]),
        resize_size=int(preset.resize_size[0]),
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        interpolation=preset.interpolation.value,
    )


def _torchvision_on_disk(name: str) -> bool:
    return _hub_file(tvm.get_model_weights(name).DEFAULT).is_file()


TORCHVISION = BackboneFamily(
    name="torchvision",
    names=_torchvision_names,
    build=_torchvision_build,
    load=_torchvision_load,
    preprocessing=_torchvision_preprocessing,
    layout=torchvision_layout,
    weights_on_disk=_torchvision_on_disk,
)


# ------------------------------------------------------- EfficientNet-Lite --

def _lite_build(name: str, num_classes: int | None) -> nn.Module:
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return lite.efficientnet_lite(name, weights=None, **kwargs)


def _lite_load(name: str, weights: Any) -> tuple[nn.Module, str]:
    if str(weights).rsplit(".", 1)[-1] not in ("DEFAULT", "IMAGENET1K_V1"):
        raise ValueError(f"Unknown weights {weights!r} for backbone {name!r}. Valid: "
                         "['DEFAULT', 'IMAGENET1K_V1'], None, or a path to a state-dict file.")
    try:
        return lite.efficientnet_lite(name, weights="DEFAULT"), f"{name}.IMAGENET1K_V1"
    except FileNotFoundError as exc:
        raise WeightsNotFoundError(str(exc)) from exc


def _lite_preprocessing(name: str, weights: Any) -> Preprocessing:
    size = lite.LITE_VARIANTS[name].image_size
    # TensorFlow's EfficientNet evaluation: centre crop with 32 px of padding, bicubic.
    return Preprocessing(crop_size=size, resize_size=size + 32, mean=(0.5,) * 3,
                         std=(0.5,) * 3, interpolation="bicubic")


def _lite_on_disk(name: str) -> bool:
    try:
        lite.lite_weights_path(name)
    except FileNotFoundError:
        return False
    return True


EFFICIENTNET_LITE = BackboneFamily(
    name="efficientnet_lite",
    names=lambda: sorted(lite.LITE_VARIANTS),
    build=_lite_build,
    load=_lite_load,
    preprocessing=_lite_preprocessing,
    layout=lambda name: Layout(classifier="fc", stages=lite.stages),
    weights_on_disk=_lite_on_disk,
    convert_state_dict=lite.convert_lite_state_dict,
)


# -------------------------------------------------------------------- timm --

def _timm_load(name: str, weights: Any) -> tuple[nn.Module, str]:
    try:
        return timm_family.load(name, weights)
    except FileNotFoundError as exc:
        raise WeightsNotFoundError(str(exc)) from exc


TIMM = BackboneFamily(
    name="timm",
    names=lambda: [],  # any "timm:" + timm.list_models() name: too many to list
    build=timm_family.build,
    load=_timm_load,
    preprocessing=timm_family.preprocessing,
    layout=timm_family.layout,
    weights_on_disk=timm_family.weights_on_disk,
    owns=timm_family.owns,
)


# ---------------------------------------------------------------- registry --

_FAMILIES: list[BackboneFamily] = [EFFICIENTNET_LITE, TIMM, TORCHVISION]


def register_family(family: BackboneFamily) -> None:
    """Add a family; its names take precedence over those of the families already there."""
    _FAMILIES.insert(0, family)


def list_backbones() -> list[str]:
    """Names accepted by ``backbone=``: torchvision classifiers and EfficientNet-Lite.

    Any model of timm is accepted too, unlisted: ``"timm:<name>"`` for a name
    of ``timm.list_models()``, or ``"timm:<name>.<tag>"`` for one of its
    pretrained tags (``timm.list_pretrained()``); it needs the ``timm`` extra.

    Examples
    --------
    >>> from skt import list_backbones
    >>> "resnet18" in list_backbones() and "efficientnet_lite0" in list_backbones()
    True
    """
    return sorted({name for family in _FAMILIES for name in family.names()})


def family_of(name: str) -> BackboneFamily | None:
    """The family that owns backbone ``name``, or None.

    Examples
    --------
    >>> from skt.backbones import family_of
    >>> family_of("resnet18").name, family_of("timm:convnext_atto").name
    ('torchvision', 'timm')
    """
    for family in _FAMILIES:
        if family.owns(name):
            return family
    return None
