"""Fine-tuning and extraction with and without transparent huge pages under torch's tensors.

PyTorch (2.1 and later) asks the kernel for transparent huge pages for its
CPU tensors of 2 MiB and more when ``THP_MEM_ALLOC_ENABLE=1`` is in the
environment before it allocates its first tensor; the ``skt`` commands
that fine-tune set it (``skt._utils.request_huge_pages``). A training step
allocates and frees gigabytes of activations, and on 4 KiB pages every step
faults all of them in again.

Each job runs in a child process, alternately with ``THP_MEM_ALLOC_ENABLE=0``
and ``=1``, ``--repeats`` times, so that both sides meet the same machine;
reported are the best of the repeats and the ratio "off / on" (above 1: huge
pages are faster), with minor page faults and peak memory of the child.

fine-tune, freeze=0
    ``FineTuneClassifier(freeze=0)``: the whole network trains; seconds per
    epoch after the first (the first also decodes).
fine-tune, freeze="auto"
    The default: frozen stages computed once, the rest trains.
extract, engine="torch"
    ``FeatureExtractor(engine="torch").transform``: forward passes alone,
    seconds for all the images.

Images are ``--images`` random uint8 300 x 300 x 3 arrays (the size of an
ELPV cell), EfficientNet-Lite0 with its ImageNet weights at 224 px, batch 32::

    python benchmarks/bench_alloc.py --images 384 --epochs 3 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

JOBS = ("finetune-freeze0", "finetune-auto", "extract-torch")
VARIABLE = "THP_MEM_ALLOC_ENABLE"


def run_job(job: str, images: int, epochs: int) -> dict:
    """One job in this process; its seconds, minor page faults and peak memory."""
    import numpy as np
    from bench_finetune import time_estimator  # this folder's fine-tuning timer

    from skt import FeatureExtractor

    X = np.random.default_rng(0).integers(0, 256, (images, 300, 300, 3), dtype=np.uint8)
    y = np.arange(images) % 2
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    if job == "extract-torch":
        extractor = FeatureExtractor(engine="torch", device="cpu").fit(X[:2])
        extractor.transform(X[:32])  # warm-up
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        extractor.transform(X)
        seconds = time.perf_counter() - start
    else:
        freeze = 0 if job == "finetune-freeze0" else "auto"
        settings = argparse.Namespace(size=224, epochs=epochs, batch_size=32)
        seconds = time_estimator(X, y, freeze, "auto", settings)["later"]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": seconds, "faults": usage.ru_minflt - faults,
            "peak_mib": usage.ru_maxrss / 1024}


def run_child(job: str, huge: bool, args) -> dict:
    env = {**os.environ, VARIABLE: "1" if huge else "0"}
    command = [sys.executable, __file__, "--child", job, "--images", str(args.images),
               "--epochs", str(args.epochs)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=JOBS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_job(args.child, args.images, args.epochs)))
        return
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is reported apart")

    os.environ.pop(VARIABLE, None)
    from skt.bench import format_machine, machine_info

    print(format_machine(machine_info()))
    print(f"efficientnet_lite0, {args.images} random 300x300 uint8 images at 224 px, batch 32, "
          f"{args.epochs} epochs; best of {args.repeats} interleaved repeats; fine-tuning: "
          "seconds per epoch after the first, extraction: seconds for all images")
    runs = {(job, huge): [] for job in args.jobs for huge in (False, True)}
    for _ in range(args.repeats):
        for job in args.jobs:
            for huge in (False, True):
                runs[job, huge].append(run_child(job, huge, args))
    print(f"{'job':<18} | {'4 KiB pages':>11} | {'huge pages':>10} | {'off / on':>8} | "
          f"{'faults off':>10} | {'faults on':>9} | {'peak MiB off':>12} | {'peak MiB on':>11}")
    for job in args.jobs:
        off, on = (min(runs[job, huge], key=lambda run: run["seconds"]) for huge in (False, True))
        print(f"{job:<18} | {off['seconds']:11.2f} | {on['seconds']:10.2f} | "
              f"{off['seconds'] / on['seconds']:7.2f}x | {off['faults']:10d} | "
              f"{on['faults']:9d} | {off['peak_mib']:12.0f} | {on['peak_mib']:11.0f}")


if __name__ == "__main__":
    main()
