"""Declared layouts of torchvision classification families: classifier name and stages.

A stage is what ``FineTuneClassifier(freeze=<int>)`` counts, in the spirit of
timm's ``feature_info``: the stem, then one stage per resolution or width group
of blocks, then head-side layers that are not the classifier. A downsampling
layer belongs to the stage that follows it. Stages name parameter-holding
modules (or parameters) by prefix, so every parameter outside the classifier is
in exactly one stage. Nothing here is inferred from layer widths: the stage
functions only read depths that vary per variant (number of blocks, pool
positions, optional auxiliary heads).
"""

from __future__ import annotations

import difflib
import fnmatch
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torchvision
from torch import nn

__all__ = ["Layout", "torchvision_layout"]

Stages = tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its classifier and its stages.

    Attributes
    ----------
    classifier : str or None
        Module name of the final ``nn.Linear`` producing the logits, e.g.
        ``"fc"``, ``"classifier.1"``, ``"heads.head"``; None when the logits
        come from something else (SqueezeNet's convolution). With None the
        stages cover every parameter of the model.
    stages : callable
        Given a built model of the family, its stages, input side first; each
        a tuple of module or parameter name prefixes (a prefix ``p`` covers
        ``p`` and names starting with ``p + "."``).
    """

    classifier: str | None
    stages: Callable[[nn.Module], Stages]


def _fixed(*stages: tuple[str, ...]) -> Callable[[nn.Module], Stages]:
    """Stages that do not depend on the variant."""
    return lambda model: stages


def _children(model: nn.Module, container: str) -> list[str]:
    return [f"{container}.{name}" for name, _ in model.get_submodule(container).named_children()]


def _split_at_pools(model: nn.Module, container: str) -> list[tuple[str, ...]]:
    """The parameter-holding layers of ``container``, cut at every max-pool (a new resolution)."""
    groups: list[tuple[str, ...]] = [()]
    for name, child in model.get_submodule(container).named_children():
        if isinstance(child, nn.MaxPool2d):
            groups.append(())
        elif any(True for _ in child.parameters()):
            groups[-1] += (f"{container}.{name}",)
    return [group for group in groups if group]


def _present(model: nn.Module, *names: str) -> tuple[str, ...]:
    """Optional modules (auxiliary classifiers) that this build has; pretrained builds drop them."""
    return tuple(name for name in names if getattr(model, name, None) is not None)


# ResNet, ResNeXt, Wide ResNet: the conv1/bn1 stem, then layer1..layer4 (one per resolution).
_RESNET = _fixed(("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))

# RegNet X/Y: the stem, then trunk_output.block1..block4 (one per resolution).
_REGNET = _fixed(("stem",), *((f"trunk_output.block{i}",) for i in range(1, 5)))

# ShuffleNetV2: conv1 stem, stage2..stage4 (one per resolution), the 1x1 conv5 head.
_SHUFFLENET = _fixed(("conv1",), ("stage2",), ("stage3",), ("stage4",), ("conv5",))

# DenseNet: conv0/norm0 stem, then a dense block with the transition (downsampling) before
# it; the final norm5 completes the pre-activation trunk, so it goes with denseblock4.
_DENSENET = _fixed(
    ("features.conv0", "features.norm0"),
    ("features.denseblock1",),
    ("features.transition1", "features.denseblock2"),
    ("features.transition2", "features.denseblock3"),
    ("features.transition3", "features.denseblock4", "features.norm5"),
)

# ConvNeXt: the patchify stem, then a block stage with the downsampling layer before it,
# then the post-pooling LayerNorm of the head.
_CONVNEXT = _fixed(
    ("features.0",),
    ("features.1",),
    ("features.2", "features.3"),
    ("features.4", "features.5"),
    ("features.6", "features.7"),
    ("classifier.0",),
)

# Swin V1/V2: the patch embedding, then a block stage with the patch merging before it; the
# final norm acts on tokens before pooling, like ViT's encoder.ln, so it goes with the last.
_SWIN = _fixed(
    ("features.0",),
    ("features.1",),
    ("features.2", "features.3"),
    ("features.4", "features.5"),
    ("features.6", "features.7", "norm"),
)

# MaxViT: the two-conv stem, then blocks.0..3 (one per resolution), then the head's
# LayerNorm and tanh pre-logits layer.
_MAXVIT = _fixed(
    ("stem",),
    ("blocks.0",),
    ("blocks.1",),
    ("blocks.2",),
    ("blocks.3",),
    ("classifier.2", "classifier.3"),
)

# MNASNet: the conv stem, the separable-conv block, the six inverted-residual stacks
# layers.8..13 (one per row of the published table), the 1x1 head conv.
_MNASNET = _fixed(
    ("layers.0", "layers.1"),
    ("layers.3", "layers.4", "layers.6", "layers.7"),
    *((f"layers.{i}",) for i in range(8, 14)),
    ("layers.14", "layers.15"),
)


def _efficientnet(model: nn.Module) -> Stages:
    """EfficientNet B/V2: features.0 stem, one ``features.i`` per MBConv stage, the head conv."""
    return tuple((name,) for name in _children(model, "features"))


def _vit(model: nn.Module) -> Stages:
    """ViT: patch embedding with class token and positions, one stage per encoder layer.

    The final norm (``encoder.ln``) goes with the last layer, whose output it normalises.
    """
    stem = ("conv_proj", "class_token", "encoder.pos_embedding")
    layers = [(name,) for name in _children(model, "encoder.layers")]
    layers[-1] += ("encoder.ln",)
    return (stem, *layers)


def _vgg_like(hidden: tuple[str, ...]) -> Callable[[nn.Module], Stages]:
    """VGG, AlexNet: the conv layers of one resolution (between max-pools), then the hidden
    fully connected layers of the classifier (timm's pre-logits) as one stage."""
    return lambda model: (*_split_at_pools(model, "features"), hidden)


def _squeezenet(model: nn.Module) -> Stages:
    """SqueezeNet: the stem conv, the Fire modules of one resolution (between max-pools), then
    the final conv: it makes the logits but is not linear, so it is a stage, not the classifier."""
    return (*_split_at_pools(model, "features"), ("classifier.1",))


def _mobilenet(
    blocks: tuple[int, ...], pre_logits: tuple[str, ...] = ()
) -> Callable[[nn.Module], Stages]:
    """MobileNetV2/V3: features.0 stem, the inverted-residual blocks grouped as the rows of
    the published table with one output width (timm's stages; ``blocks`` counts each group's
    blocks), the last 1x1 conv, then the hidden linear layer of V3's head if any."""

    def stages(model: nn.Module) -> Stages:
        names = _children(model, "features")
        if sum(blocks) != len(names) - 2:
            raise ValueError(
                f"This MobileNet has {len(names) - 2} blocks, not the {sum(blocks)} of the "
                "torchvision builder's default configuration, the only one whose stages are "
                "declared."
            )
        bounds = itertools.accumulate(blocks, initial=1)
        groups = [tuple(names[start:end]) for start, end in itertools.pairwise(bounds)]
        return ((names[0],), *groups, (names[-1],), *((pre_logits,) if pre_logits else ()))

    return stages


def _googlenet(model: nn.Module) -> Stages:
    """GoogLeNet: one stage per resolution (the groups between max-pools, conv1 the stem);
    the auxiliary classifiers, when built, go with the 14x14 stage they read from."""
    return (
        ("conv1",),
        ("conv2", "conv3"),
        ("inception3a", "inception3b"),
        ("inception4a", "inception4b", "inception4c", "inception4d", "inception4e",
         *_present(model, "aux1", "aux2")),
        ("inception5a", "inception5b"),
    )


def _inception_v3(model: nn.Module) -> Stages:
    """Inception V3: one stage per resolution as in timm's feature_info; the reduction blocks
    Mixed_6a/Mixed_7a start the stage they downsample to; AuxLogits, when built, goes with
    the 17x17 stage it reads from."""
    return (
        ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
        ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
        ("Mixed_5b", "Mixed_5c", "Mixed_5d"),
        ("Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
         *_present(model, "AuxLogits")),
        ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
    )


# (fnmatch patterns, layout); the first family whose pattern matches the name wins.
_TORCHVISION: tuple[tuple[tuple[str, ...], Layout], ...] = (
    (("alexnet",), Layout("classifier.6", _vgg_like(("classifier.1", "classifier.4")))),
    (("convnext_*",), Layout("classifier.2", _CONVNEXT)),
    (("densenet*",), Layout("classifier", _DENSENET)),
    (("efficientnet_b?", "efficientnet_v2_?"), Layout("classifier.1", _efficientnet)),
    (("googlenet",), Layout("fc", _googlenet)),
    (("inception_v3",), Layout("fc", _inception_v3)),
    (("maxvit_t",), Layout("classifier.5", _MAXVIT)),
    (("mnasnet*",), Layout("classifier.1", _MNASNET)),
    (("mobilenet_v2",), Layout("classifier.1", _mobilenet((1, 2, 3, 4, 3, 3, 1)))),
    (("mobilenet_v3_large",),
     Layout("classifier.3", _mobilenet((1, 2, 3, 4, 2, 3), ("classifier.0",)))),
    (("mobilenet_v3_small",),
     Layout("classifier.3", _mobilenet((1, 2, 3, 2, 3), ("classifier.0",)))),
    (("regnet_x_*", "regnet_y_*"), Layout("fc", _REGNET)),
    (("resnet*", "resnext*", "wide_resnet*"), Layout("fc", _RESNET)),
    (("shufflenet_v2_*",), Layout("fc", _SHUFFLENET)),
    (("squeezenet*",), Layout(None, _squeezenet)),
    (("swin_*",), Layout("head", _SWIN)),
    (("vgg*",), Layout("classifier.6", _vgg_like(("classifier.0", "classifier.3")))),
    (("vit_*",), Layout("heads.head", _vit)),
)


def torchvision_layout(name: str) -> Layout:
    """The declared layout of torchvision classification model ``name``.

    Raises
    ------
    ValueError
        If ``name`` is not a classification model of ``torchvision.models`` (the message
        lists close names), or no family here declares it (a model newer than this table).
    """
    models = torchvision.models.list_models(module=torchvision.models)
    if name not in models:
        close = difflib.get_close_matches(name, models, n=5)
        hint = f" Close names: {', '.join(map(repr, close))}." if close else ""
        raise ValueError(
            f"{name!r} is not a classification model of torchvision.models.{hint} "
            "torchvision.models.list_models(module=torchvision.models) lists them."
        )
    for patterns, layout in _TORCHVISION:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            return layout
    raise ValueError(
        f"No family declares the classifier and stages of torchvision model {name!r}; "
        "add its layout to skt/backbones/_families.py."
    )
