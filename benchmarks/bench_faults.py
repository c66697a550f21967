"""Bad inputs and killed runs, counted: how many are handled cleanly.

Draws ``--cases`` generated inputs (:mod:`skt.bench._faults`: arrays,
tensors, PIL images, files under any name, whole ``X`` values) and runs each
through ``FeatureExtractor.transform`` (raising, or with ``on_error="skip"``) or
``FineTuneClassifier.predict_proba``,
a tenth as many through ``FineTuneClassifier.fit`` and, files only, through
``skt extract``; then kills ``skt extract`` with SIGKILL
``--kills`` times at random points and re-runs it. Prints the counts::

    handled cleanly / raw errors / silent misalignments / corrupt outputs

The expected result is all / 0 / 0 / 0. Each non-clean case is listed with
what happened, so it can be reproduced. About two minutes::

    python benchmarks/bench_faults.py --cases 1000 --kills 20
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skt import FeatureExtractor, FineTuneClassifier
from skt.bench import format_machine, machine_info
from skt.bench._faults import (
    bad_inputs,
    classify,
    classify_skipping,
    command_entry,
    file_cases,
)

TINY = dict(backbone="resnet18", weights=None, image_size=16, random_state=0, device="cpu",
            num_workers=0)


TINY_OPTIONS = ("--backbone", "resnet18", "--weights", "none", "--random-state", "0",
                "--image-size", "16", "--engine", "torch", "--num-workers", "0")


def run_cases(n_cases: int, seed: int) -> tuple[collections.Counter, list[str]]:
    rng = np.random.default_rng(0)
    extractor = FeatureExtractor(**TINY, engine="torch").fit([np.zeros((8, 8, 3), np.uint8)])
    classifier = FineTuneClassifier(**TINY, max_iter=1, batch_size=4, freeze=None).fit(
        rng.integers(0, 256, (8, 12, 12, 3), dtype=np.uint8), np.arange(8) % 2)
    counts: collections.Counter = collections.Counter()
    problems: list[str] = []
    scratch = Path(tempfile.mkdtemp(prefix="skt-faults-"))
    from skt.cli import main as skt_main

    extract = command_entry(skt_main, scratch, TINY_OPTIONS)
    skipping = FeatureExtractor(**TINY, engine="torch", on_error="skip").fit(
        [np.zeros((8, 8, 3), np.uint8)])
    entries = {"transform": extractor.transform, "predict_proba": classifier.predict_proba,
               "transform (on_error='skip')": skipping}

    @settings(max_examples=n_cases, deadline=None, database=None, derandomize=seed == 0,
              suppress_health_check=list(HealthCheck))
    @given(case=bad_inputs(), entry=st.sampled_from(sorted(entries)))
    def one(case, entry):
        with tempfile.TemporaryDirectory(dir=scratch) as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # on_error="skip" counts its skips
            outcome, detail = (classify_skipping(skipping, case, Path(folder))
                               if entries[entry] is skipping
                               else classify(entries[entry], case, Path(folder)))
        counts[outcome] += 1
        if outcome != "clean":
            problems.append(f"{outcome:6s} {entry}: {case.label}: {detail[:160]}")

    @settings(max_examples=max(1, n_cases // 10), deadline=None, database=None,
              derandomize=seed == 0, suppress_health_check=list(HealthCheck))
    @given(case=file_cases().filter(lambda case: case.path))
    def one_file(case):
        with tempfile.TemporaryDirectory(dir=scratch) as folder:
            outcome, detail = classify(extract, case, Path(folder))
        counts[outcome] += 1
        if outcome != "clean":
            problems.append(f"{outcome:6s} skt extract: {case.label}: {detail[:160]}")

    @settings(max_examples=max(1, n_cases // 10), deadline=None, database=None,
              derandomize=seed == 0, suppress_health_check=list(HealthCheck))
    @given(case=bad_inputs())
    def one_fit(case):
        def fit(X):
            labels = np.arange(len(X)) % 2 if hasattr(X, "__len__") else None
            return FineTuneClassifier(**TINY, max_iter=1, batch_size=4, freeze=None).fit(
                X, labels)

        with tempfile.TemporaryDirectory(dir=scratch) as folder:
            outcome, detail = classify(fit, case, Path(folder), compare=False)
        counts[outcome] += 1
        if outcome != "clean":
            problems.append(f"{outcome:6s} fit: {case.label}: {detail[:160]}")

    one()
    one_file()
    one_fit()
    return counts, problems


def kill_cycles(n_cycles: int, seed: int) -> list[str]:
    """Kill ``skt extract`` at a random point ``n_cycles`` times, resume, compare with a clean run.

    Alternates ``.npy`` and ``.npz`` outputs, with and without ``--cache``; each
    cycle's outcome is ``"identical"``, ``"finished"`` (the run ended before the
    kill) or what differed.
    """
    import random

    from PIL import Image

    from skt.cli import kill_and_resume
    from skt.cli import main as skt_main

    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="skt-kills-"))
    images = root / "images"
    pixels = np.random.default_rng(seed)
    for i in range(192):
        label = images / ("even", "odd")[i % 2]
        label.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            label / f"{i:03d}.png")
    options = [*TINY_OPTIONS[:-2], "--batch-size", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads as this process below

    def files(folder: Path) -> dict[str, bytes]:
        return {path.name: path.read_bytes() for path in folder.iterdir()}

    import torch

    torch.set_num_threads(1)
    for suffix in (".npy", ".npz"):
        (root / "reference").mkdir(exist_ok=True)
        assert skt_main(["extract", str(images), "-o", str(root / "reference" / f"f{suffix}"),
                         *options]) == 0
    references = files(root / "reference")
    outcomes = []
    for cycle in range(n_cycles):
        suffix = (".npy", ".npz")[cycle % 2]
        cache = ["--cache", str(root / "cache")] if cycle % 4 >= 2 else []
        folder = root / f"cycle-{cycle}"
        argv = ["extract", str(images), "-o", str(folder / f"f{suffix}"), *options, *cache]
        try:
            _, status, err = kill_and_resume(argv, after_rows=rng.choice([1, 8, 40, 96]),
                                             delay=rng.uniform(0, 0.5), env=env)
        except RuntimeError:
            outcomes.append("finished")
            continue
        got = files(folder)
        wrong = sorted(name for name in got if got[name] != references.get(name))
        if suffix == ".npy":
            wrong += sorted({"f.npy", "f.paths.jsonl", "f.labels.jsonl"} - set(got))
        outcomes.append("identical" if status == 0 and not wrong else
                        f"status {status}, differing {wrong}: {err.strip()[-200:]}")
    return outcomes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0,
                        help="0: the same cases every run; otherwise fresh random ones")
    args = parser.parse_args(argv)
    print(format_machine(machine_info()))
    start = time.perf_counter()
    counts, problems = run_cases(args.cases, args.seed)
    print(f"\n{sum(counts.values())} generated inputs in {time.perf_counter() - start:.0f} s")
    for line in problems:
        print("  " + line)
    corrupt = 0
    if args.kills:
        start = time.perf_counter()
        outcomes = kill_cycles(args.kills, args.seed)
        corrupt = sum(outcome not in ("identical", "finished") for outcome in outcomes)
        print(f"{args.kills} kill-and-resume cycles of skt extract in "
              f"{time.perf_counter() - start:.0f} s: {outcomes.count('identical')} identical "
              f"to an uninterrupted run, {outcomes.count('finished')} finished before the kill")
        for outcome in outcomes:
            if outcome not in ("identical", "finished"):
                print("  corrupt: " + outcome)
    print(f"\nhandled cleanly {counts['clean']} / raw errors {counts['raw']} / "
          f"silent misalignments {counts['silent']} / corrupt outputs {corrupt}")


if __name__ == "__main__":
    main()
