"""What a pretrained backbone expects of its input, in one small dataclass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Resize, centre-crop and normalisation applied to every image.

    Images are resized so that their shorter side is ``resize_size`` (keeping
    the aspect ratio), centre-cropped to ``crop_size`` x ``crop_size``, scaled
    to [0, 1] and normalised with ``mean`` and ``std`` per RGB channel.
    """

    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    @property
    def crop_fraction(self) -> float:
        return self.crop_size / self.resize_size


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
) -> Preprocessing:
    """Combine the sources of preprocessing settings, most specific first.

    Explicit arguments override the configuration that came with the weights,
    which overrides ImageNet defaults. A new ``image_size`` keeps the weights'
    ratio of crop to resize, so 224/256 becomes 160/183 for ``image_size=160``.
    """
    config = weights_config or Preprocessing()
    if image_size is not None:
        config = replace(config, crop_size=int(image_size),
                         resize_size=round(image_size / config.crop_fraction))
    if mean is not None:
        config = replace(config, mean=_rgb_triple("mean", mean))
    if std is not None:
        config = replace(config, std=_rgb_triple("std", std))
    return config
