"""The ``timm:`` family: any model ``timm.create_model`` knows, as a backbone.

``backbone="timm:<name>"`` takes any name of ``timm.list_models()``, and
``"timm:<name>.<tag>"`` one of its pretrained tags (``timm.list_pretrained()``),
whose configuration then sets the preprocessing and the head size. Everything
is read from timm's declared metadata: preprocessing from the pretrained
configuration, the classifier from its ``classifier`` entry, the stages from
the model's ``group_matcher``. timm is imported on first use, never by
``import skt``; it comes with the ``timm`` extra (``pip install "skt[timm]"``).

Weights come from the Hugging Face hub cache (or torch hub's, for the few
tags hosted elsewhere). A cached file is read without any network request;
a missing one is downloaded only after one quick request shows the server
is reachable, so that an offline machine gets its error at once, not after
timm's minute of retries.
"""

from __future__ import annotations

import math
import os
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from skt._utils import close_matches
from skt.backbones._families import Layout, Stages
from skt.images import Preprocessing

__all__ = ["PREFIX", "build", "layout", "load", "owns", "preprocessing", "weights_on_disk"]

PREFIX = "timm:"
"""Backbone names of this family start with it: ``"timm:convnext_atto"``."""

_PROBE_SECONDS = 5.0
"""How long the one reachability request before a download may wait."""


def owns(name: str) -> bool:
    """Whether ``name`` belongs to this family (the prefix alone decides; timm validates)."""
    return isinstance(name, str) and name.startswith(PREFIX)


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise ImportError('backbone="timm:..." needs timm, which comes with the timm extra: '
                          'pip install "skt[timm]"') from exc
    return timm


def _split(name: str) -> tuple[str, str | None]:
    """``"timm:<name>[.<tag>]"`` -> (name, tag or None), the name checked against timm's."""
    timm = _timm()
    model, _, tag = name[len(PREFIX):].partition(".")
    if not timm.is_model(model):
        models = timm.list_models()
        raise ValueError(
            f"Unknown timm model {model!r} in backbone={name!r}."
            f"{close_matches(model, models, n=5, cutoff=0.5)} timm.list_models() lists the "
            f"{len(models)} names accepted after 'timm:'."
        )
    return model, tag or None


def _full_name(name: str) -> str:
    return name[len(PREFIX):]


def _pretrained_cfg(name: str, weights: Any):
    """timm's ``PretrainedCfg`` of the tag that ``weights`` picks.

    A tag names itself; None and ``"DEFAULT"`` pick the tag in the name, or
    the model's default tag (timm's first) when the name has none.
    """
    from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg

    model, name_tag = _split(name)
    tag = name_tag if weights is None or weights == "DEFAULT" else weights
    if not isinstance(tag, str | None):
        raise ValueError(f"weights={weights!r}: a timm backbone takes 'DEFAULT', a pretrained "
                         "tag, a path to a weights file, or None.")
    if name_tag is not None and tag != name_tag:
        raise ValueError(f"backbone={name!r} names the tag {name_tag!r}, weights={weights!r} "
                         "another; pass the tag in one place.")
    if tag is None:
        return get_pretrained_cfg(model)
    cfgs = get_arch_pretrained_cfgs(model)
    if f"{model}.{tag}" not in cfgs:
        tags = [key.split(".", 1)[1] for key in cfgs]
        raise ValueError(
            f"Unknown weights {tag!r} for backbone {name!r}.{close_matches(tag, tags)} Valid: "
            f"{['DEFAULT', *tags]}, None for random init, or a path to a weights file."
        )
    return cfgs[f"{model}.{tag}"]


def build(name: str, num_classes: int | None) -> nn.Module:
    """A randomly initialised ``name`` (with the head of its tag's configuration)."""
    _split(name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return _timm().create_model(_full_name(name), pretrained=False, **kwargs)


# ---------------------------------------------------------------- weights --

def _hub_repo(cfg) -> tuple[str, str | None]:
    repo, _, revision = cfg.hf_hub_id.partition("@")
    return repo, revision or None


def _hub_filenames(cfg) -> list[str]:
    """The files timm looks for in the repository, in its order: safetensors first."""
    filename = cfg.hf_hub_filename or "pytorch_model.bin"
    safe = {"pytorch_model.bin": "model.safetensors",
            "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}.get(filename)
    if safe is None and filename.endswith(".bin"):
        safe = filename[:-len(".bin")] + ".safetensors"
    return [safe, filename] if safe else [filename]


def _torch_hub_file(url: str) -> Path:
    return (Path(torch.hub.get_dir()) / "checkpoints"
            / os.path.basename(urllib.parse.urlparse(url).path))


def _cached_file(cfg) -> tuple[Path, bool] | None:
    """The weights file already on disk, and whether it is in the tag's original format
    (a torch hub download of ``cfg.url``, which ``custom_load`` tags read their own way)."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, revision = _hub_repo(cfg)
        for filename in _hub_filenames(cfg):
            found = try_to_load_from_cache(repo, filename, revision=revision)
            if isinstance(found, str):  # not None, nor the marker of a known-missing file
                return Path(found), False
    if cfg.url and _torch_hub_file(cfg.url).is_file():
        return _torch_hub_file(cfg.url), True
    return None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _unreachable(url: str) -> str | None:
    """Why the server of ``url`` cannot be reached, or None: one request, no retries."""
    parts = urllib.parse.urlparse(url)
    request = urllib.request.Request(f"{parts.scheme}://{parts.netloc}/", method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=_PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except OSError as exc:  # no route, no name resolution, refused, timed out
        return str(getattr(exc, "reason", exc))
    return None


def _source_url(cfg) -> str:
    if cfg.hf_hub_id:
        from huggingface_hub import hf_hub_url

        repo, revision = _hub_repo(cfg)
        return hf_hub_url(repo, _hub_filenames(cfg)[0], revision=revision)
    return cfg.url


def _missing_message(cfg, reason: str) -> str:
    label = f"{cfg.architecture}.{cfg.tag}"
    url = _source_url(cfg)
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        repo, _ = _hub_repo(cfg)
        filename = _hub_filenames(cfg)[0]
        where = (
            f"not in the Hugging Face hub cache and could not be downloaded ({reason}). The "
            f"cache folder is {constants.HF_HUB_CACHE} (set HF_HOME or HF_HUB_CACHE to move "
            f"it). On a machine with internet access, run `hf download {repo} {filename}` "
            "(`huggingface-cli download` before huggingface_hub 1.0) and copy the folder "
            f"models--{repo.replace('/', '--')} of its cache into that folder; or download "
            f"{url} and pass"
        )
    else:
        target = _torch_hub_file(url)
        filename = target.name
        where = (
            f"not in the torch hub cache and could not be downloaded ({reason}). The cache "
            f"folder is {target.parent} (set TORCH_HOME to move it). On a machine with "
            f"internet access, download {url} and place the file at {target}; or pass"
        )
    return (f"The timm weights {label!r} of backbone 'timm:{cfg.architecture}' are {where} "
            f"backbone='timm:{label}', weights='path/to/{filename}'; or weights=None "
            "(random init).")


def load(name: str, weights: Any) -> tuple[nn.Module, str]:
    """``name`` with the pretrained weights of tag ``weights`` (``"DEFAULT"``: the default).

    Raises
    ------
    FileNotFoundError
        The weights are not cached and cannot be downloaded (the registry
        raises it as :class:`~skt.backbones.WeightsNotFoundError`); the
        message says where to put them.
    """
    cfg = _pretrained_cfg(name, weights)
    label = f"{cfg.architecture}.{cfg.tag}"
    if not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ValueError(f"timm has no pretrained weights for {label!r}; pass weights=None "
                         "(random init) or a path to a weights file.")
    cached = _cached_file(cfg)
    if cached is not None:
        path, original_format = cached
        # A file override makes timm read it directly, without asking the hub whether
        # it is current; a hub file is in timm's own format whatever the tag's custom_load.
        overlay = {"file": str(path), "custom_load": original_format and cfg.custom_load}
    else:
        reason = ("HF_HUB_OFFLINE is set" if cfg.hf_hub_id and _hub_offline()
                  else _unreachable(_source_url(cfg)))
        if reason is not None:
            raise FileNotFoundError(_missing_message(cfg, reason))
        overlay = {}
    try:
        model = _timm().create_model(label, pretrained=True, pretrained_cfg_overlay=overlay)
    except OSError as exc:  # hub and HTTP errors, a connection lost mid-download
        raise FileNotFoundError(_missing_message(cfg, str(exc))) from exc
    return model, label


def weights_on_disk(name: str) -> bool:
    """Whether the default (or named) tag's weights load without a download."""
    return _cached_file(_pretrained_cfg(name, None)) is not None


# ---------------------------------------------------------- preprocessing --

def preprocessing(name: str, weights: Any) -> Preprocessing:
    """What the tag's weights expect, from timm's ``resolve_data_config``.

    As timm's evaluation transform: resize to ``floor(crop / crop_pct)``, then
    a centre crop. ``crop_mode="squash"`` resizes the whole image to the crop
    size; timm squashes to ``crop / crop_pct`` and then crops, which is the
    same for the many tags with ``crop_pct=1`` and a few percent wider a view
    for the rest. ``"border"`` (keep the ratio, pad to a square; six tags)
    becomes a centre crop, as ``Preprocessing`` does not pad.
    """
    from timm.data import resolve_data_config

    config = resolve_data_config(pretrained_cfg=_pretrained_cfg(name, weights).to_dict())
    crop = int(config["input_size"][-1])  # square crops: the few non-square tags use the width
    squash = config.get("crop_mode") == "squash"
    return Preprocessing(
        crop_size=crop,
        resize_size=crop if squash else math.floor(crop / config["crop_pct"]),
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        interpolation=config["interpolation"],
        crop_mode="squash" if squash else "center",
    )


# ----------------------------------------------------------------- layout --

def layout(name: str) -> Layout:
    """The classifier that timm's configuration declares, and stages from ``group_matcher``.

    A configuration with ``num_classes=0`` builds the model without a head
    (DINOv2, SigLIP, SAM encoders): it has no classifier and its output is
    the features.

    Raises
    ------
    ValueError
        For models with several classifier heads (DeiT's distilled models,
        CrossViT), which one classifier name cannot describe.
    """
    cfg = _pretrained_cfg(name, None)
    classifier = cfg.classifier
    if isinstance(classifier, tuple | list):
        raise ValueError(
            f"timm model {cfg.architecture!r} has {len(classifier)} classifier heads "
            f"{tuple(classifier)}, combined in its forward pass; skt backbones have one "
            "classifier. Pick a model with a single head."
        )
    if not cfg.num_classes:
        classifier = None
    return Layout(classifier, lambda model: _stages(model, classifier))


def _inside(name: str, prefix: str | None) -> bool:
    return prefix is not None and (name == prefix or name.startswith(prefix + "."))


def _containers_matcher(model: nn.Module):
    """Group by top-level child, a Sequential or ModuleList split into its items: the stages
    of the few models that declare no ``group_matcher`` (MetaFormer, PiT)."""
    children = {name: index for index, (name, _) in enumerate(model.named_children())}
    containers = {name for name, child in model.named_children()
                  if isinstance(child, nn.Sequential | nn.ModuleList)}

    def group(param: str) -> tuple[int, int]:
        parts = param.split(".")
        if parts[0] not in children:  # a parameter of the model itself (a class token)
            return (-1, 0)
        item = int(parts[1]) if parts[0] in containers and parts[1].isdigit() else 0
        return (children[parts[0]], item)

    return group


def _parameter_groups(model: nn.Module) -> dict[str, int]:
    """Parameter name -> stage number, from timm's coarse grouping (its layer-decay groups:
    the stem, one group per stage or block, head-side layers last), else its fine one."""
    from timm.models._manipulate import group_parameters

    group_matcher = getattr(model, "group_matcher", None)
    if group_matcher is not None:
        for coarse in (True, False):
            try:
                return group_parameters(model, group_matcher(coarse=coarse), reverse=True)
            except (AssertionError, NotImplementedError):  # a grouping the model lacks
                continue
    return group_parameters(model, _containers_matcher(model), reverse=True)


def _stages(model: nn.Module, classifier: str | None) -> Stages:
    """timm's parameter groups as stages of name prefixes, the classifier left out.

    Each parameter is named by its shortest prefix whose parameters all lie in
    its group (and none in the classifier), so every parameter outside the
    classifier is in exactly one stage.
    """
    groups = _parameter_groups(model)
    head = -1

    def group_of(param: str) -> int:
        return head if _inside(param, classifier) else groups[param]

    params = [param for param, _ in model.named_parameters()]
    under: dict[str, set[int]] = defaultdict(set)
    for param in params:
        parts = param.split(".")
        for depth in range(1, len(parts) + 1):
            under[".".join(parts[:depth])].add(group_of(param))
    stages: dict[int, list[str]] = {}
    for param in params:
        group = group_of(param)
        if group == head:
            continue
        parts = param.split(".")
        prefix = next(".".join(parts[:depth]) for depth in range(1, len(parts) + 1)
                      if len(under[".".join(parts[:depth])]) == 1)
        stage = stages.setdefault(group, [])
        if prefix not in stage:
            stage.append(prefix)
    return tuple(tuple(stages[group]) for group in sorted(stages))
