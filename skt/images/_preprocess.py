"""What a network expects of its input, and the transform that gives it that."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF

__all__ = ["AUGMENTATIONS", "CROP_MODES", "DIHEDRAL_VIEWS", "IMAGENET_MEAN", "IMAGENET_STD",
           "Preprocessing", "dihedral_view", "preprocess", "random_crop_box", "view_count",
           "view_of"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CROP_MODES = ("center", "squash")
"""Values of ``crop_mode``: resize the shorter side and cut the centre, or resize the whole
image to the square input (no crop)."""

AUGMENTATIONS = (None, "flip", "dihedral", "standard")
"""Values of ``augment``: none, random horizontal flips, random flips and quarter turns
(one of the 8 :func:`dihedral_view` views), random resized crops with flips."""

DIHEDRAL_VIEWS = 8
"""Views of a square image under flips and quarter turns (the dihedral group D4)."""


def dihedral_view(image: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` (0-7) of an image or batch: quarter turns, then a mirror.

    ``view % 4`` quarter turns counter-clockwise, then, for ``view >= 4``, a
    horizontal flip. View 0 is the image itself and view 4 its mirror image,
    so the two views of ``augment="flip"`` are views 0 and 4. Acts on the
    last two dimensions; turns keep the shape of square images only.

    Examples
    --------
    >>> import torch
    >>> from skt.images import dihedral_view
    >>> image = torch.tensor([[1, 2], [3, 4]])
    >>> [dihedral_view(image, v).flatten().tolist() for v in (0, 1, 4, 5)]
    [[1, 2, 3, 4], [2, 4, 1, 3], [2, 1, 4, 3], [4, 2, 3, 1]]
    """
    if not 0 <= view < DIHEDRAL_VIEWS:
        raise ValueError(f"view={view}; the dihedral views are numbered 0 to 7.")
    image = torch.rot90(image, view % 4, dims=(-2, -1)) if view % 4 else image
    return image.flip(-1) if view >= 4 else image


def view_count(augment: str | None) -> int:
    """How many fixed views ``augment`` draws from: 1, 2 (flips) or 8 (dihedral).

    0 for ``"standard"``, whose random crops are not a finite set of views.
    """
    return {None: 1, "flip": 2, "dihedral": DIHEDRAL_VIEWS}.get(augment, 0)


def view_of(draw: int, augment: str | None) -> int:
    """The :func:`dihedral_view` number of draw ``draw`` (``0 <= draw < view_count``)."""
    return 4 * draw if augment == "flip" else draw


@dataclass(frozen=True)
class Preprocessing:
    """Resize, centre-crop and normalisation applied to every image.

    With ``crop_mode="center"``, images are resized so that their shorter
    side is ``resize_size`` (keeping the aspect ratio) and centre-cropped to
    ``crop_size`` x ``crop_size``. With ``"squash"``, for images that are
    already framed, the whole image is resized to ``crop_size`` x
    ``crop_size`` (stretched if it is not square; timm's ``crop_mode``) and
    ``resize_size`` equals ``crop_size``. Then pixels are scaled to [0, 1]
    and normalised with ``mean`` and ``std`` per RGB channel.
    """

    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode={self.crop_mode!r}; choose one of {CROP_MODES}.")
        if self.crop_mode == "squash" and self.resize_size != self.crop_size:
            raise ValueError(f"crop_mode='squash' resizes to crop_size ({self.crop_size}); "
                             f"resize_size is {self.resize_size}, it must equal it.")

    @property
    def crop_fraction(self) -> float:
        return self.crop_size / self.resize_size


def _finish(image: torch.Tensor, config: Preprocessing) -> torch.Tensor:
    image = TF.to_dtype(image, torch.float32, scale=True)
    if config.interpolation != "nearest":
        image = image.clamp(0, 1)  # bicubic overshoots
    return TF.normalize(image, config.mean, config.std)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def random_crop_box(height: int, width: int, generator: torch.Generator | None = None,
                    scale: tuple[float, float] = (0.25, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random crop, as Inception's training crops.

    Its area is a uniform fraction ``scale`` of the image's and its aspect
    ratio log-uniform in ``ratio``; after ten draws that do not fit, the
    largest centred crop within ``ratio``.
    """
    area = height * width
    for _ in range(10):
        target = area * _uniform(*scale, generator)
        aspect = math.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), generator))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, round(width / aspect)) if width / height < aspect else (
        round(height * aspect), height)
    return (height - h) // 2, (width - w) // 2, h, w


MAX_ASPECT = 32
"""Images more than this many times longer than wide (or wider than high) are cut, before
resizing, to the part the centre crop keeps, plus a margin for the resize's filter:
resizing all of a 1 x 100,000 strip would take gigabytes. The crop then sees the same
part of the image, shifted by less than one resized pixel; other images are unaffected."""


def _trim_long_side(image: torch.Tensor, config: Preprocessing) -> torch.Tensor:
    """The centre of an elongated image, with a margin for the resize's filter; others as given."""
    height, width = image.shape[-2:]
    short, long = min(height, width), max(height, width)
    if long <= MAX_ASPECT * short:
        return image
    scale = short / config.resize_size  # original pixels per resized pixel
    keep = min(long, math.ceil(config.crop_size * scale + 4 * math.ceil(scale) + 4))
    keep += (long - keep) % 2  # the same centre as the whole image's
    start = (long - keep) // 2
    return image[..., :, start:start + keep] if width > height else (
        image[..., start:start + keep, :])


def preprocess(image: torch.Tensor, config: Preprocessing, augment: str | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Resize, crop and normalise one ``(3, H, W)`` image.

    ``augment=None`` is the evaluation transform: resize the shorter side,
    centre-crop (or, with ``config.crop_mode="squash"``, resize the whole
    image to the square input). ``"flip"`` adds a random horizontal flip; ``"dihedral"`` a
    random one of the 8 flips and quarter turns (:func:`dihedral_view`),
    for images with no up or down; ``"standard"`` is a
    random resized crop (:func:`random_crop_box`, scale 0.25-1, aspect
    3/4-4/3) plus a flip. Random draws come from ``generator`` (torch's
    global generator when None).

    Examples
    --------
    >>> import torch
    >>> from skt.images import Preprocessing, preprocess
    >>> config = Preprocessing(crop_size=8, resize_size=10, mean=(0.5,) * 3, std=(0.5,) * 3)
    >>> out = preprocess(torch.full((3, 20, 30), 255, dtype=torch.uint8), config)
    >>> tuple(out.shape), float(out.max())  # (255 / 255 - 0.5) / 0.5
    ((3, 8, 8), 1.0)
    """
    interpolation = TF.InterpolationMode(config.interpolation)
    if augment == "standard":
        top, left, height, width = random_crop_box(*image.shape[-2:], generator)
        image = TF.resized_crop(image, top, left, height, width,
                                [config.crop_size, config.crop_size],
                                interpolation=interpolation, antialias=True)
    elif config.crop_mode == "squash":
        image = TF.resize(image, [config.crop_size, config.crop_size],
                          interpolation=interpolation, antialias=True)
    else:
        image = _trim_long_side(image, config)
        image = TF.resize(image, config.resize_size, interpolation=interpolation, antialias=True)
        image = TF.center_crop(image, config.crop_size)
    if augment in ("flip", "standard") and torch.rand((), generator=generator) < 0.5:
        image = TF.horizontal_flip(image)
    if augment == "dihedral":
        image = dihedral_view(image, int(torch.randint(0, DIHEDRAL_VIEWS, (),
                                                       generator=generator)))
    return _finish(image, config)
