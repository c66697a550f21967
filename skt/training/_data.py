"""Labelled image batches for training and validation."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import closing

import numpy as np
import torch

from skt._utils import memory_format
from skt.images import Preprocessing, dihedral_view, iter_batches, view_count, view_of
from skt.training._trunk import Trunk, TrunkStore

__all__ = ["CACHE_BYTES", "ImageBatches"]

CACHE_BYTES = 1 << 30
"""Preprocessed training or validation images are kept in memory, instead of
being preprocessed again every epoch, while they fit in this many bytes."""


class ImageBatches:
    """``(images, labels)`` batches of a training or validation split.

    Images are decoded and resized by ``num_workers`` threads (see
    :func:`skt.images.iter_batches`). Without augmentation the preprocessed
    images do not change between epochs: each is computed the first time an
    epoch draws it and kept while they fit in :data:`CACHE_BYTES`, so later
    epochs cost no decoding or resizing. With augmentation every epoch
    prepares new random views. Shuffled batches draw their order, and each
    image's augmentation seed, from ``generator``: the same generator state
    gives the same batches whatever ``num_workers`` is. A final batch of one
    image is left out of a shuffled epoch, since BatchNorm cannot train on it.

    Given a :class:`~skt.training.Trunk` (:meth:`use_trunk`), batches
    hold the trunk's outputs instead of images: each image's output under
    each view is computed the first time the epoch's draw asks for it, then
    read from a :class:`~skt.training.TrunkStore`. ``augment=None``
    has one view, ``"flip"`` two and ``"dihedral"`` eight
    (:func:`skt.images.dihedral_view`); each epoch draws one per image.
    ``store`` (``"auto"``, ``"memory"`` or ``"disk"``), ``max_epochs`` and
    ``folder`` configure the store.

    Decoding threads never outlive the batch iterator that started them, nor
    an error raised while they run (even one a caller keeps, with its
    traceback); :meth:`close` frees what the batches keep between epochs.

    ``shard=(rank, world)`` gives one of ``world`` processes training
    together its share. Shuffled: every process draws the same epoch (the
    order, the augmentation seeds and the views, exactly as one process
    would), cuts it into the same global batches of ``batch_size``, splits
    each into ``world`` contiguous pieces of near-equal size (the first
    ``batch_size % world`` one item larger) and keeps piece ``rank``; it
    decodes, augments and computes trunk outputs for its pieces only. A
    final partial batch is kept only if every piece has at least two items
    (one process keeps one of two or more). Unshuffled (validation): the
    process takes the ``rank``-th of ``world`` contiguous parts of
    ``indices``. None (the default): one process, everything.
    """

    def __init__(self, images: Sequence, y: np.ndarray, indices: Sequence[int],
                 config: Preprocessing, batch_size: int, *, augment: str | None = None,
                 shuffle: bool = False, num_workers: int = 0,
                 generator: torch.Generator | None = None, store: str = "auto",
                 max_epochs: int = 1, folder: str | os.PathLike | None = None,
                 shard: tuple[int, int] | None = None) -> None:
        self.images = images
        self.indices = list(indices)
        if shard is not None and not shuffle:
            rank, world = shard
            self.indices = [int(i) for i in np.array_split(self.indices, world)[rank]]
        self.labels = torch.as_tensor(np.asarray(y)[self.indices], dtype=torch.long)
        self.config = config
        self.batch_size = batch_size
        self.augment = augment
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.generator = generator
        self.store = store
        self.max_epochs = max_epochs
        self.folder = folder
        self.shard = shard
        self.trunk: Trunk | None = None
        self.device = torch.device("cpu")
        self._cached: torch.Tensor | None = None
        self._decoded: np.ndarray | None = None
        self._store: TrunkStore | None = None

    def use_trunk(self, trunk: Trunk | None, device: torch.device) -> None:
        """Yield ``trunk``'s outputs from now on (images again for None)."""
        if trunk is not self.trunk:
            self._close_store()
            self.trunk = trunk
        self.device = device

    def close(self) -> None:
        """Drop what is kept between epochs: preprocessed images, trunk outputs and their file."""
        self._cached = None
        self._decoded = None
        self._close_store()

    def _close_store(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __len__(self) -> int:
        """Batches per epoch (global batches, with a ``shard``)."""
        full, rest = divmod(len(self.indices), self.batch_size)
        if not self.shuffle:
            return full + (rest > 0)
        return full + (rest >= 2 * (1 if self.shard is None else self.shard[1]))

    def _pieces(self, total: int) -> tuple[torch.Tensor, int]:
        """Positions this process keeps of an epoch's ``total`` items, and its batch size.

        Its piece of a full global batch has the same size in every batch,
        and that of the final partial batch is no larger: the kept positions
        in batches of that size are exactly its pieces.
        """
        if self.shard is None or not self.shuffle:
            return torch.arange(total), self.batch_size
        rank, world = self.shard
        pieces = [np.array_split(np.arange(start, min(start + self.batch_size, total)),
                                 world)[rank] for start in range(0, total, self.batch_size)]
        size = len(np.array_split(np.arange(self.batch_size), world)[rank])
        return torch.as_tensor(np.concatenate(pieces or [np.zeros(0, dtype=np.int64)])), size

    def _cache(self, order: torch.Tensor, batch_size: int) -> torch.Tensor | None:
        """The preprocessed images, those of ``order`` decoded now if they are not yet."""
        size = self.config.crop_size
        if self.augment is not None or len(self.indices) * 3 * size * size * 4 > CACHE_BYTES:
            return None
        if self._decoded is None:
            self._decoded = np.zeros(len(self.indices), dtype=bool)
        missing = [i for i in order.tolist() if not self._decoded[i]]
        batches = iter_batches(self.images, self.config, batch_size, self.num_workers,
                               [self.indices[i] for i in missing])
        with closing(batches):
            for start, images in zip(range(0, len(missing), batch_size), batches, strict=True):
                if self._cached is None:
                    self._cached = images.new_empty((len(self.indices), *images.shape[1:]))
                rows = missing[start:start + batch_size]
                self._cached[rows] = images
                self._decoded[rows] = True
        return self._cached

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.indices)
        order = (torch.randperm(n, generator=self.generator) if self.shuffle
                 else torch.arange(n))
        order = order[:len(self) * self.batch_size]
        # Every process draws the whole epoch (order, views, seeds), then keeps its pieces.
        if self.trunk is not None:
            n_views = view_count(self.augment)
            draws = (torch.randint(0, n_views, (len(order),), generator=self.generator).numpy()
                     if self.shuffle and n_views > 1 else np.zeros(len(order), dtype=np.int64))
            mine, size = self._pieces(len(order))
            yield from self._trunk_batches(order[mine], draws[mine.numpy()], size)
            return
        seeds = None
        if self.augment is not None:
            seeds = torch.randint(0, 2**62, (len(order),), generator=self.generator)
        mine, size = self._pieces(len(order))
        order = order[mine]
        cached = None if not len(order) else self._cache(order, size)
        if cached is not None:
            for start in range(0, len(order), size):
                rows = order[start:start + size]
                yield cached[rows], self.labels[rows]
            return
        seeds = None if seeds is None else seeds[mine].tolist()
        with closing(iter_batches(self.images, self.config, size, self.num_workers,
                                  [self.indices[i] for i in order.tolist()],
                                  augment=self.augment, seeds=seeds)) as batches:
            for start, images in zip(range(0, len(order), size), batches, strict=True):
                yield images, self.labels[order[start:start + size]]

    def unaugmented(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every item's trunk output for the image as given (view 0), in order, in batches.

        Computed where missing and kept, like the epochs' batches (an epoch
        without augmentation then computes nothing). Needs :meth:`use_trunk`.
        """
        order = torch.arange(len(self.indices))
        yield from self._trunk_batches(order, np.zeros(len(order), dtype=np.int64),
                                       self.batch_size)

    def _trunk_batches(self, order: torch.Tensor, draws: np.ndarray,
                       batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._store is None:
            self._store = TrunkStore(len(self.indices), view_count(self.augment), self.store,
                                     max_filled=self.max_epochs, folder=self.folder)
        store = self._store
        items = order.numpy()
        missing = ~store.filled[items, draws]
        images = iter_batches(self.images, self.config, batch_size, self.num_workers,
                              [self.indices[i] for i in items[missing]])
        ready: deque[torch.Tensor] = deque()
        fmt = memory_format(self.device)
        # Closed on the way out, also when the trunk or the store fails: the
        # threads decoding ahead stop then, not when the frames are collected.
        with closing(images):
            for start in range(0, len(order), batch_size):
                rows = items[start:start + batch_size]
                views = draws[start:start + batch_size]
                need = np.flatnonzero(missing[start:start + batch_size])
                if len(need):
                    while len(ready) < len(need):
                        ready.extend(next(images).unbind(0))
                    batch = torch.stack([dihedral_view(ready.popleft(),
                                                       view_of(int(views[i]), self.augment))
                                         for i in need])
                    batch = batch.to(self.device).contiguous(memory_format=fmt)
                    store.put(rows[need], views[need], self.trunk.features(batch))
                yield store.get(rows, views), self.labels[order[start:start + batch_size]]
