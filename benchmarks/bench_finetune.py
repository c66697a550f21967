"""One epoch of FineTuneClassifier against a minimal hand-written PyTorch loop.

Both start from the same uint8 images and do the same work: build
EfficientNet-Lite0 with its ImageNet weights and a new two-class head,
preprocess the images with ``skt.images.preprocess``, and train one epoch
with AdamW, the same batch size and no augmentation, channels-last on the
CPU, BatchNorm on batch statistics (``batchnorm="batch"``; the default
``"auto"`` fixes Lite0's pretrained statistics, which costs no more). Each
side runs ``--repeats`` times, alternating, and the fastest run of each is
compared, since other processes on the machine only ever add time::

    python benchmarks/bench_finetune.py --images 256 --size 112 --threads 2

The ratio (FineTuneClassifier / hand-written) is expected to be at most 1.15.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from skt.backbones import resolve_backbone
from skt.finetune import FineTuneClassifier
from skt.images import load_image, preprocess

BACKBONE = "efficientnet_lite0"


def hand_written_epoch(X: np.ndarray, y: np.ndarray, size: int, batch_size: int) -> None:
    backbone = resolve_backbone(BACKBONE, "DEFAULT", image_size=size)
    model = backbone.model
    model.fc = nn.Linear(model.fc.in_features, int(y.max()) + 1)
    images = torch.stack([preprocess(load_image(image), backbone.preprocessing) for image in X])
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.as_tensor(y)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images[rows]), labels[rows])
        loss.backward()
        optimizer.step()
    model.eval()


def fine_tune_epoch(X: np.ndarray, y: np.ndarray, size: int, batch_size: int) -> None:
    FineTuneClassifier(BACKBONE, image_size=size, max_iter=1, batch_size=batch_size,
                       batchnorm="batch", device="cpu", random_state=0).fit(X, y)


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    y = np.arange(args.images) % 2
    times: dict[str, list[float]] = {"hand-written loop": [], "FineTuneClassifier": []}
    for _ in range(args.repeats):
        times["hand-written loop"].append(
            timed(hand_written_epoch, X, y, args.size, args.batch_size))
        times["FineTuneClassifier"].append(
            timed(fine_tune_epoch, X, y, args.size, args.batch_size))

    print(f"{BACKBONE}, {args.images} images of {args.size} px, batch {args.batch_size}, "
          f"one epoch, {torch.get_num_threads()} threads, best of {args.repeats}:")
    for name, values in times.items():
        print(f"  {name:20s} {min(values):7.2f} s   (runs: "
              f"{', '.join(f'{v:.2f}' for v in values)})")
    ratio = min(times["FineTuneClassifier"]) / min(times["hand-written loop"])
    print(f"  ratio FineTuneClassifier / hand-written: {ratio:.3f} (expected <= 1.15)")


if __name__ == "__main__":
    main()
