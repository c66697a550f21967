"""Labelled image batches for training and validation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from skt.images import Preprocessing, iter_batches

__all__ = ["CACHE_BYTES", "ImageBatches"]

CACHE_BYTES = 1 << 30
"""Preprocessed training or validation images are kept in memory, instead of
being preprocessed again every epoch, while they fit in this many bytes."""


class ImageBatches:
    """``(images, labels)`` batches of a training or validation split.

    Images are decoded and resized by ``num_workers`` threads (see
    :func:`skt.images.iter_batches`). Without augmentation the preprocessed
    images do not change between epochs: they are computed once and kept
    while they fit in :data:`CACHE_BYTES`, so an epoch costs no decoding or
    resizing. With augmentation every epoch prepares new random views.
    Shuffled batches draw their order, and each image's augmentation seed,
    from ``generator``: the same generator state gives the same batches
    whatever ``num_workers`` is. A final batch of one image is left out of a
    shuffled epoch, since BatchNorm cannot train on it.
    """

    def __init__(self, images: Sequence, y: np.ndarray, indices: Sequence[int],
                 config: Preprocessing, batch_size: int, *, augment: str | None = None,
                 shuffle: bool = False, num_workers: int = 0,
                 generator: torch.Generator | None = None) -> None:
        self.images = images
        self.indices = list(indices)
        self.labels = torch.as_tensor(np.asarray(y)[self.indices], dtype=torch.long)
        self.config = config
        self.batch_size = batch_size
        self.augment = augment
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.generator = generator
        self._cached: torch.Tensor | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(len(self.indices), self.batch_size)
        return full + (rest > 1 or (rest == 1 and not self.shuffle))

    def _cache(self) -> torch.Tensor | None:
        size = self.config.crop_size
        if self.augment is not None or len(self.indices) * 3 * size * size * 4 > CACHE_BYTES:
            return None
        if self._cached is None:
            self._cached = torch.cat(list(iter_batches(
                self.images, self.config, self.batch_size, self.num_workers, self.indices)))
        return self._cached

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.indices)
        order = (torch.randperm(n, generator=self.generator) if self.shuffle
                 else torch.arange(n))
        order = order[:len(self) * self.batch_size]
        cached = self._cache()
        if cached is not None:
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                yield cached[rows], self.labels[rows]
            return
        seeds = None
        if self.augment is not None:
            seeds = torch.randint(0, 2**62, (len(order),), generator=self.generator).tolist()
        batches = iter_batches(self.images, self.config, self.batch_size, self.num_workers,
                               [self.indices[i] for i in order.tolist()],
                               augment=self.augment, seeds=seeds)
        for start, images in zip(range(0, len(order), self.batch_size), batches, strict=True):
            yield images, self.labels[order[start:start + self.batch_size]]
