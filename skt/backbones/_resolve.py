"""Turn ``backbone=`` and ``weights=`` into an ``nn.Module``, its preprocessing and layout."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from sklearn.utils import check_random_state
from torch import nn

from skt._utils import close_matches, expand_path
from skt.backbones._registry import BackboneFamily, family_of, list_backbones
from skt.images import Preprocessing

__all__ = [
    "Backbone",
    "classifier_name",
    "list_stages",
    "resolve_backbone",
    "resolve_preprocessing",
    "weights_available_offline",
]

_STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
Stages = tuple[tuple[str, ...], ...]


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
    classifier : str or None
        Module name of the final linear classifier; None when there is none.
    stages : tuple of tuple of str
        Name prefixes of each stage, input side first (see :func:`list_stages`).
    """

    model: nn.Module
    name: str
    weights: str | None
    preprocessing: Preprocessing
    rebuildable: bool
    classifier: str | None
    stages: Stages


def _rgb_triple(name: str, value: Sequence[float] | float) -> tuple[float, float, float]:
    values = (value,) * 3 if isinstance(value, int | float) else tuple(float(v) for v in value)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"{name} must be one number or three (R, G, B); got {value!r}.")
    if name == "std" and min(values) <= 0:
        raise ValueError(f"std must be positive; got {value!r}.")
    return values  # type: ignore[return-value]


def resolve_preprocessing(
    weights_config: Preprocessing | None,
    image_size: int | None = None,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    crop_mode: str | None = None,
) -> Preprocessing:
    """Combine the sources of preprocessing settings, most specific first.

    Explicit arguments override the configuration that came with the weights,
    which overrides ImageNet defaults. A new ``image_size`` keeps the weights'
    ratio of crop to resize, so 224/256 becomes 160/183 for ``image_size=160``;
    ``crop_mode="squash"`` resizes to the crop size itself, with no crop.

    Examples
    --------
    >>> from skt.backbones import resolve_preprocessing
    >>> config = resolve_preprocessing(None, image_size=160, mean=0.5)
    >>> config.crop_size, config.resize_size, config.mean
    (160, 183, (0.5, 0.5, 0.5))
    """
    config = weights_config or Preprocessing()
    if crop_mode is not None and crop_mode != config.crop_mode:
        resize = (config.crop_size if crop_mode == "squash"
                  else round(config.crop_size / Preprocessing().crop_fraction))
        config = replace(config, crop_mode=crop_mode, resize_size=resize)
    if image_size is not None:
        config = replace(config, crop_size=int(image_size),
                         resize_size=round(image_size / config.crop_fraction))
    if mean is not None:
        config = replace(config, mean=_rgb_triple("mean", mean))
    if std is not None:
        config = replace(config, std=_rgb_triple("std", std))
    return config


def _family(name: Any) -> BackboneFamily:
    family = family_of(name) if isinstance(name, str) else None
    if family is None:
        raise ValueError(
            f"Unknown backbone {str(name)!r}."
            f"{close_matches(str(name), list_backbones(), n=5, cutoff=0.5)} "
            "'timm:<name>' takes any model of timm.list_models(). "
            "skt.list_backbones() lists the valid names; an nn.Module instance is accepted too."
        )
    return family


def weights_available_offline(name: str) -> bool:
    """Whether ``name``'s default pretrained weights load without a download."""
    return _family(name).weights_on_disk(name)


def _is_path(weights: Any) -> bool:
    if isinstance(weights, os.PathLike):
        return True
    return isinstance(weights, str) and (
        os.sep in weights or "/" in weights or weights.startswith("~")
        or weights.lower().endswith(_STATE_DICT_SUFFIXES) or os.path.isfile(weights)
    )


def _safetensors_reader(path) -> Callable[..., dict[str, torch.Tensor]]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ImportError(f"weights={str(path)!r} is a safetensors file; reading it needs "
                          'safetensors, which comes with the safe extra: pip install "skt[safe]"'
                          ) from exc
    return load_file


def _load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: a ``torch.save`` file, or ``.safetensors`` (Hugging Face hub)."""
    path = expand_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights={str(path)!r}: no such file. Pass the path of a "
                                "state-dict file, a weights name such as 'DEFAULT', or None.")
    safetensors = path.suffix.lower() == ".safetensors"
    read_safetensors = _safetensors_reader(path) if safetensors else None
    try:
        state = (read_safetensors(path, device="cpu") if read_safetensors
                 else torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        how = ("safetensors.torch.save_file(model.state_dict(), path)" if safetensors
               else "torch.save(model.state_dict(), path)")
        raise ValueError(f"weights={str(path)!r} could not be read as a state dict "
                         f"({exc}). Save it with {how}.") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"weights={str(path)!r} does not hold a state dict (a mapping of "
                         "parameter names to tensors).")
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], label: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"The state dict in {label} does not fit this backbone: {exc}") from exc


def classifier_name(model: nn.Module) -> str | None:
    """Name of a user module's classifier: its last ``nn.Linear`` in ``named_modules`` order.

    Named backbones declare theirs in the registry instead.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


def _module_stages(model: nn.Module, classifier: str | None) -> Stages:
    """A user module's stages: each top-level child holding parameters, in registration order.

    The classifier is not a stage; parameters registered on the module itself
    join the first stage.
    """
    def outside_classifier(name: str) -> bool:
        return classifier is None or not (name == classifier or name.startswith(classifier + "."))

    stages = [(name,) for name, child in model.named_children()
              if outside_classifier(name) and any(
                  outside_classifier(f"{name}.{p}") for p, _ in child.named_parameters())]
    direct = tuple(name for name, _ in model.named_parameters(recurse=False))
    if direct:
        stages = [direct + stages[0], *stages[1:]] if stages else [direct]
    return tuple(stages)


def _build_from_file(family: BackboneFamily, name: str, path: str | os.PathLike) -> nn.Module:
    state = family.convert_state_dict(_load_state_dict_file(path))
    model = family.build(name, None)
    head = family.layout(name).classifier
    if head is not None:
        # A fine-tuned checkpoint may have its own number of classes.
        weight = state.get(f"{head}.weight")
        if weight is not None and weight.shape[0] != model.get_submodule(head).out_features:
            model = family.build(name, int(weight.shape[0]))
    _load_into(model, state, f"weights={str(path)!r}")
    return model


def _random_init(family: BackboneFamily, name: str, random_state: Any) -> nn.Module:
    if random_state is None:
        return family.build(name, None)
    seed = int(check_random_state(random_state).randint(0, 2**31 - 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return family.build(name, None)


def _resolve_module(module: nn.Module, weights: Any, image_size, mean, std,
                    crop_mode) -> Backbone:
    model = copy.deepcopy(module)
    if weights is not None and not (isinstance(weights, str) and weights == "DEFAULT"):
        if not _is_path(weights):
            raise ValueError(
                f"weights={weights!r} cannot be applied to a user module; pass a path to "
                "a state-dict file, or None to use the module as given."
            )
        _load_into(model, _load_state_dict_file(weights), f"weights={str(weights)!r}")
    label = "module" if weights in (None, "DEFAULT") else f"path:{os.fspath(weights)}"
    classifier = classifier_name(model)
    return Backbone(model.eval(), type(module).__name__, label,
                    resolve_preprocessing(None, image_size, mean, std, crop_mode),
                    rebuildable=False,
                    classifier=classifier, stages=_module_stages(model, classifier))


def resolve_backbone(
    backbone: str | nn.Module,
    weights: Any = "DEFAULT",
    *,
    image_size: int | None = None,
    mean: Any = None,
    std: Any = None,
    crop_mode: str | None = None,
    random_state: Any = None,
) -> Backbone:
    """Build the network for ``backbone`` with ``weights``, its preprocessing and layout.

    Parameters
    ----------
    backbone : str or nn.Module
        A name from :func:`list_backbones`, ``"timm:<name>"`` for any model of
        ``timm.list_models()`` (``"timm:<name>.<tag>"`` for a pretrained tag's
        configuration), or a module the user built (which is deep-copied,
        never modified).
    weights : {"DEFAULT"}, str, path, WeightsEnum or None
        ``"DEFAULT"`` or an enum member name (``"IMAGENET1K_V2"``) for
        pretrained weights (for ``"timm:<name>"``, a pretrained tag such as
        ``"in1k"``), a path to a state-dict file (``torch.save`` or
        ``.safetensors``), or None for random initialisation. For a user
        module, None and ``"DEFAULT"`` both mean "as given".
    image_size : int, optional
        Overrides the crop size of the weights' preprocessing.
    mean, std : float or sequence of 3 floats, optional
        Override the normalisation (a user module gets ImageNet's by default).
    crop_mode : {"center", "squash"}, optional
        Overrides how the weights' preprocessing frames images
        (see :class:`skt.images.Preprocessing`).
    random_state : int, RandomState or None
        Seeds random initialisation (``weights=None``) so that it is repeatable.

    Returns
    -------
    Backbone

    Examples
    --------
    >>> from skt.backbones import resolve_backbone
    >>> backbone = resolve_backbone("resnet18", weights=None, image_size=64, random_state=0)
    >>> backbone.classifier, backbone.preprocessing.crop_size, backbone.stages[1]
    ('fc', 64, ('layer1',))
    """
    if isinstance(backbone, nn.Module):
        return _resolve_module(backbone, weights, image_size, mean, std, crop_mode)
    family = _family(backbone)
    name = backbone
    if weights is None:
        model, label = _random_init(family, name, random_state), None
        rebuildable = isinstance(random_state, int)
    elif _is_path(weights):
        model, label = _build_from_file(family, name, weights), f"path:{os.fspath(weights)}"
        rebuildable = False
    else:
        model, label = family.load(name, weights)
        rebuildable = True
    base = family.preprocessing(name, None if weights is None or _is_path(weights) else weights)
    layout = family.layout(name)
    config = resolve_preprocessing(base, image_size, mean, std, crop_mode)
    return Backbone(model.eval(), name, label, config, rebuildable, layout.classifier,
                    tuple(layout.stages(model)))


def list_stages(backbone: str | nn.Module) -> list[tuple[str, ...]]:
    """The stages that ``FineTuneClassifier(freeze=<int>)`` counts, input side first.

    Named backbones declare theirs in the registry, per family, as timm
    declares ``feature_info``: the stem, then one stage per resolution or
    width group of blocks, then head-side layers that are not the classifier.
    For a user module, each top-level child holding parameters is a stage.
    Each stage is a tuple of module (or parameter) name prefixes; the
    classifier is never part of one.

    Examples
    --------
    >>> from skt import list_stages
    >>> list_stages("resnet18")
    [('conv1', 'bn1'), ('layer1',), ('layer2',), ('layer3',), ('layer4',)]
    >>> len(list_stages("efficientnet_lite0"))  # stem, 7 block stages, head convolution
    9
    """
    return list(resolve_backbone(backbone, weights=None).stages)
