"""Extraction from in-memory arrays on an idle machine and with another process on one core.

Per-image preprocessing (resize, normalise) runs torch kernels; left with
torch's default intra-op threads, each small kernel is split over every core
and waits for all of them, and on a busy machine a descheduled thread stalls
every split. skt preprocesses each image on one thread
(``skt.images._batching.PREPROCESS_THREADS``), while the network keeps its threads.
This script measures, side by side in one run and best of ``--rounds``
interleaved rounds, the images per second of ``FeatureExtractor.transform``
on uint8 arrays with preprocessing on torch's default threads ("before") and
on one thread ("after"), and then with the network on one thread as well
(``n_threads=1``), idle and with busy-looping processes (``--busy``, default one: a core held
elsewhere).

Usage::

    python benchmarks/bench_threads.py [--images 256] [--sizes 112,224] [--rounds 3] [--busy 1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np

import skt.images._batching as batching
from skt import FeatureExtractor
from skt.bench import format_machine, machine_info


def _rate(extractor: FeatureExtractor, X: np.ndarray, threads: int | None) -> float:
    batching.PREPROCESS_THREADS = threads
    start = time.perf_counter()
    extractor.transform(X)
    return len(X) / (time.perf_counter() - start)


def _busy_cores(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--sizes", default="112,224")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--busy", type=int, default=1,
                        help="busy-looping processes of the loaded rows (default: 1)")
    args = parser.parse_args()

    print(format_machine(machine_info()))
    X = np.random.default_rng(0).integers(0, 256, (args.images, 256, 256, 3), dtype=np.uint8)
    print(f"{args.images} uint8 arrays of 256x256, {args.backbone}, best of {args.rounds} "
          "interleaved rounds, images per second")
    print(f"{'size':>5} {'load':<24} {'before':>7} {'after':>7} {'n_threads=1':>11} "
          f"{'after/before':>12}")
    for size in map(int, args.sizes.split(",")):
        extractors = {n: FeatureExtractor(args.backbone, image_size=size, n_threads=n).fit(X[:1])
                      for n in (None, 1)}
        for extractor in extractors.values():
            extractor.transform(X[:64])  # warm up the engine
        rows = (("before", None, None), ("after", None, 1), ("n_threads=1", 1, 1))
        loaded = f"{args.busy} busy process{'es' if args.busy > 1 else ''}"
        for load in ("idle", loaded):
            busy = _busy_cores(args.busy if load != "idle" else 0)
            try:
                best = dict.fromkeys([name for name, _, _ in rows], 0.0)
                for _ in range(args.rounds):
                    for name, network, preprocess in rows:
                        rate = _rate(extractors[network], X, preprocess)
                        best[name] = max(best[name], rate)
            finally:
                for process in busy:
                    process.kill()
                    process.wait()
            print(f"{size:>5} {load:<24} {best['before']:7.1f} {best['after']:7.1f} "
                  f"{best['n_threads=1']:11.1f} {best['after'] / best['before']:11.2f}x",
                  flush=True)
    batching.PREPROCESS_THREADS = 1


if __name__ == "__main__":
    main()
