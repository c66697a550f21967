"""Extraction over Dask workers: 1 worker against 2, and the Dask path against plain transform.

On the same ELPV cell images (PNG files), in one run, rounds interleaved so
that a busy spell of the machine hits every row alike (each row reports its
best round, since other processes only ever add time):

(a) transform   ``FeatureExtractor.transform`` in this process, one torch thread
(b) dask x1     :func:`skt.distributed.extract` on a ``LocalCluster`` of one
                worker process with one thread (Dask gives each worker one
                torch thread: ``OMP_NUM_THREADS=1``)
(c) dask x2     the same on two such workers

Both clusters start, and every worker builds its network, before the timed
rounds (a warm-up extraction of a few images). The ratio (c)/(b) is what a
second worker adds on this machine (at most the number of cores); (b)/(a)
is the overhead of the Dask path: partition files, scheduling, the
consolidated ``features.npy``.

Usage::

    python benchmarks/bench_distributed.py [--images 480] [--partition-size 120] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from distributed import Client, LocalCluster

import skt.distributed as sd
from skt import FeatureExtractor
from skt.bench import format_machine, machine_info
from skt.datasets import load_elpv, subsample


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--partition-size", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()

    torch.set_num_threads(1)
    print(format_machine(machine_info()))
    paths = list(subsample(load_elpv(return_paths=True), args.images, random_state=0).images)
    extractor = FeatureExtractor(args.backbone).fit(paths)
    work = Path(tempfile.mkdtemp(prefix="skt-bench-distributed-"))
    clusters = {workers: LocalCluster(n_workers=workers, threads_per_worker=1,
                                      dashboard_address=None) for workers in (1, 2)}
    clients = {workers: Client(cluster, set_as_default=False)
               for workers, cluster in clusters.items()}
    try:
        for client in clients.values():  # every worker builds its network before timing
            sd.extract(paths[:8 * len(client.scheduler_info()["workers"])], extractor,
                       work / "warm-up", client=client, partition_size=8)
            shutil.rmtree(work / "warm-up")
        extractor.transform(paths[:8])

        def on_cluster(workers: int):
            def run():
                sd.extract(paths, extractor, work / f"x{workers}", client=clients[workers],
                           partition_size=args.partition_size)
                shutil.rmtree(work / f"x{workers}")
            return run

        rows = {"transform": lambda: extractor.transform(paths),
                "dask x1": on_cluster(1), "dask x2": on_cluster(2)}
        times: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.rounds):
            for name, run in rows.items():
                times[name].append(_timed(run))
    finally:
        for client in clients.values():
            client.close()
        for cluster in clusters.values():
            cluster.close()
        shutil.rmtree(work, ignore_errors=True)

    best = {name: min(values) for name, values in times.items()}
    print(f"\n{args.images} ELPV cells, {args.backbone} ({extractor.engine_} engine), "
          f"partitions of {args.partition_size}, best of {args.rounds} interleaved rounds")
    print(f"{'row':<12} {'img/s':>8}  rounds (s)")
    for name, seconds in best.items():
        rounds = " ".join(f"{value:.1f}" for value in times[name])
        print(f"{name:<12} {args.images / seconds:8.1f}  {rounds}")
    print(f"\n2 workers / 1 worker: {best['dask x1'] / best['dask x2']:.2f}x the throughput")
    print(f"Dask overhead on 1 worker: {best['dask x1'] / best['transform']:.2f}x the time of "
          "plain transform")


if __name__ == "__main__":
    main()
