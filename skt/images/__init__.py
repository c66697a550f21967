"""Images in, normalised tensors out: validate, decode, preprocess, batch.

:func:`as_image_list` checks any accepted ``X`` (paths, PIL images, arrays,
tensors; see :mod:`skt.images._validate`) and names the first bad item;
:func:`load_image` decodes one item to an upright RGB tensor (EXIF
orientation applied, see :func:`apply_orientation`); :func:`preprocess`
resizes, crops and normalises it as a :class:`Preprocessing` says;
:func:`iter_batches` does all of it for many images, decoding in threads,
and can record items that cannot be read instead of raising. This package
knows nothing of networks.
"""

from skt.images._batching import ImageDataset, iter_batches, torch_threads
from skt.images._decode import apply_orientation, load_image
from skt.images._folder import list_image_files, load_image_folder
from skt.images._preprocess import (
    AUGMENTATIONS,
    CROP_MODES,
    DIHEDRAL_VIEWS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    dihedral_view,
    preprocess,
    random_crop_box,
    view_count,
    view_of,
)
from skt.images._validate import as_image_list, describe_item

__all__ = [
    "AUGMENTATIONS",
    "CROP_MODES",
    "DIHEDRAL_VIEWS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageDataset",
    "Preprocessing",
    "apply_orientation",
    "as_image_list",
    "describe_item",
    "dihedral_view",
    "iter_batches",
    "list_image_files",
    "load_image",
    "load_image_folder",
    "preprocess",
    "random_crop_box",
    "torch_threads",
    "view_count",
    "view_of",
]
