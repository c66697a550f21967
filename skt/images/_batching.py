"""Preprocessed images in batches: a map-style dataset, and a threaded batch iterator."""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

from skt.images._decode import load_image
from skt.images._preprocess import AUGMENTATIONS, Preprocessing, preprocess

__all__ = ["PREPROCESS_THREADS", "ImageDataset", "iter_batches", "torch_threads"]

PREPROCESS_THREADS: int | None = 1
"""torch intra-op threads that preprocess one image (None: torch's setting, unchanged).

An image's resize and normalisation are small kernels: split over every core, each
waits for all of them, and on a busy machine one descheduled thread stalls every
split (``benchmarks/bench_threads.py``). Decoding threads then do not compete with
the network's threads either. The network keeps torch's setting."""


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run this thread's torch kernels on ``threads`` intra-op threads, then restore.

    None leaves torch's setting alone.
    """
    previous = torch.get_num_threads()
    if threads is None or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ImageDataset(torch.utils.data.Dataset):
    """Validated images as a map-style dataset of preprocessed tensors.

    Parameters
    ----------
    images : sequence
        Validated images (see :func:`skt.images.as_image_list`).
    config : Preprocessing
    indices : sequence of int, optional
        The items of ``images`` it holds, in order; default all.
    augment : {None, "flip", "standard"}
        Training augmentation (see :func:`skt.images.preprocess`).
    seeds : sequence of int, optional
        With ``augment``, one seed per position: the item's random view
        depends on its seed alone, whichever thread or process prepares it
        and in whatever order. Without seeds, torch's global generator.
    """

    def __init__(self, images: Sequence, config: Preprocessing,
                 indices: Sequence[int] | None = None, augment: str | None = None,
                 seeds: Sequence[int] | None = None) -> None:
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment={augment!r}; choose one of {AUGMENTATIONS}.")
        self.images = images
        self.config = config
        self.augment = augment
        self.indices = list(range(len(images))) if indices is None else list(indices)
        self.seeds = None if seeds is None else list(seeds)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> torch.Tensor:
        index = self.indices[position]  # errors name the item's index in X
        image = load_image(self.images[index], index, draft=self.config.resize_size)
        generator = None
        if self.augment is not None and self.seeds is not None:
            generator = torch.Generator().manual_seed(self.seeds[position])
        with torch_threads(PREPROCESS_THREADS):
            return preprocess(image, self.config, self.augment, generator)


def iter_batches(images: Sequence, config: Preprocessing, batch_size: int,
                 num_workers: int, indices: Sequence[int] | None = None, *,
                 augment: str | None = None, seeds: Sequence[int] | None = None,
                 failures: dict[int, str] | None = None) -> Iterator[torch.Tensor]:
    """Preprocessed batches of ``images`` (or of the items at ``indices``), in order.

    With ``num_workers > 0``, image files are decoded and resized by that many
    threads, up to two batches ahead of the consumer, while the network runs:
    PIL's decoders, torch's resize and both engines release the GIL, and
    threads, unlike DataLoader processes, cost nothing to start on every call
    (a grid search transforms dozens of times). At most ``2 * batch_size``
    decoded images are held at once. ``augment`` and ``seeds`` are those of
    :class:`ImageDataset`: with seeds, the batches do not depend on
    ``num_workers``.

    ``failures`` None (the default): the first item that cannot be read
    raises its ``ValueError`` or ``TypeError``, and decoding stops (threads
    included) before the error reaches the caller. A dict: such an error is
    recorded as ``failures[index] = message`` instead, and the item's place
    in its batch holds an all-zero image, so batches stay aligned with
    ``indices``; items already in ``failures`` (refused by
    :func:`skt.images.as_image_list`) are not read at all.
    """
    dataset = ImageDataset(images, config, indices, augment, seeds)
    refused = frozenset(failures or ())
    blank = torch.zeros(3, config.crop_size, config.crop_size)

    def prepare(position: int) -> torch.Tensor | None:
        return None if dataset.indices[position] in refused else dataset[position]

    def settle(position: int, get: Callable[[], torch.Tensor | None]) -> torch.Tensor:
        try:
            image = get()
        except (ValueError, TypeError) as exc:
            if failures is None:
                raise
            failures[dataset.indices[position]] = str(exc)
            image = None
        finally:
            del get  # a future's result: it holds the error, whose traceback holds this frame
        return blank if image is None else image

    decode = any(isinstance(images[i], str | os.PathLike) for i in dataset.indices[:1])
    if num_workers == 0 or not decode or len(dataset) <= batch_size:
        for start in range(0, len(dataset), batch_size):
            yield torch.stack([settle(k, partial(prepare, k))
                               for k in range(start, min(start + batch_size, len(dataset)))])
        return
    window = 2 * batch_size
    with ThreadPoolExecutor(num_workers, thread_name_prefix="skt-decode") as pool:
        pending: deque = deque()
        submitted = 0
        batch: list = []
        try:
            while submitted < len(dataset) or pending:
                while submitted < len(dataset) and len(pending) < window:
                    pending.append((submitted, pool.submit(prepare, submitted)))
                    submitted += 1
                position, future = pending.popleft()
                try:
                    batch.append(settle(position, future.result))
                finally:
                    del future  # as in settle: no cycle through the error's traceback
                if len(batch) == batch_size or (not pending and submitted == len(dataset)):
                    yield torch.stack(batch)
                    batch = []
        finally:  # an error or an abandoned iterator: do not decode the rest
            for _, future in pending:
                future.cancel()
