"""JPEG decode + resize + normalise throughput: today's PIL path against faster decoders.

For each set of JPEG files, in one run, interleaved, best of ``--repeats`` rounds,
images per second on one thread and on two (a thread pool, as
:func:`skt.images.iter_batches` decodes), all at 224 px
(``Preprocessing(crop_size=224, resize_size=256)``):

(a) pil          today: :func:`skt.images.load_image` (PIL, JPEG ``draft`` to
                 the smallest power-of-two reduction whose shorter side is still
                 at least 256, EXIF orientation) then :func:`skt.images.preprocess`
                 (torch resize with antialias, centre crop, normalise);
(b) simplejpeg   ``simplejpeg.decode_jpeg`` (libjpeg-turbo) at the same
                 power-of-two scale as (a), via ``min_height``/``min_width``,
                 then the same :func:`~skt.images.preprocess`; no EXIF look-up
                 (none of these files has an Orientation tag): the library's best case;
(b') sj-fast     (b) with ``fastdct=True, fastupsample=True``;
(c) torchvision  ``torchvision.io.decode_jpeg`` (no DCT scaling: full size),
                 EXIF orientation applied, then the same preprocess;
(d) pillow-simd  (a) in a second interpreter whose PIL is pillow-simd
                 (``--pillow-simd PYTHON``), against (a) in a child of this
                 interpreter, alternated, best of the same rounds.

Each is also compared with (a) pixel for pixel: the largest and the mean absolute
difference of the preprocessed tensors, in normalised units and in 0-255 units.
The sets: the 20 ImageNet JPEGs of the ``foolbox`` package (progressive, mostly
512x512), and baseline 4:2:0 quality-90 JPEGs of 500x375 (ImageNet's typical
size), 1024x768 and 3000x2000 (a phone photo) made from scikit-image's sample
photos with a little grain (``bench_extract.make_photos``).

pillow-simd has no wheels on PyPI; to measure it, build it in a throwaway
virtual environment (it replaces Pillow, so never in the project's) and let it
see this environment's torch and skt::

    python3 -m venv /tmp/simdvenv
    /tmp/simdvenv/bin/pip install pybind11 setuptools wheel
    CC="cc -mavx2" /tmp/simdvenv/bin/pip install --no-build-isolation pillow-simd
    echo "$PWD/.venv/lib/python3.11/site-packages" \\
        > /tmp/simdvenv/lib/python3.11/site-packages/zz_main.pth

Usage::

    python benchmarks/bench_decode.py [--repeats 5] [--images 120]
        [--sets foolbox,500x375,1024x768,3000x2000] [--pillow-simd /tmp/simdvenv/bin/python]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from bench_extract import make_photos  # benchmarks/ is on the path of a script
from PIL import Image

from skt.images import Preprocessing, load_image, preprocess
from skt.images._batching import PREPROCESS_THREADS, torch_threads
from skt.images._decode import _draft_size

CONFIG = Preprocessing(crop_size=224, resize_size=256)
DRAFT = CONFIG.resize_size
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ files --

def foolbox_jpegs() -> list[str]:
    """The 20 ImageNet JPEGs of the foolbox wheel (its own imports need more; not imported)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return sorted(str(path) for path in folder.glob("imagenet_*.jpg"))


# -------------------------------------------------------------- pipelines --

def pil_draft_scale(size: tuple[int, int], shorter_side: int) -> int:
    """The reduction (1, 2, 4 or 8) PIL's ``draft`` picks for skt's request, as in
    ``JpegImageFile.draft``."""
    wanted = _draft_size(size, shorter_side)  # what load_image asks PIL for
    fits = min(size[0] // wanted[0], size[1] // wanted[1])
    return next(s for s in (8, 4, 2, 1) if fits >= s)


def today(path: str) -> torch.Tensor:
    return preprocess(load_image(path, draft=DRAFT), CONFIG)


def simplejpeg_pipeline(fast: bool) -> Callable[[str], torch.Tensor]:
    import simplejpeg

    def run(path: str) -> torch.Tensor:
        data = Path(path).read_bytes()
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        scale = pil_draft_scale((width, height), DRAFT)
        pixels = simplejpeg.decode_jpeg(data, min_height=-(-height // scale),
                                        min_width=-(-width // scale),
                                        fastdct=fast, fastupsample=fast)
        return preprocess(torch.from_numpy(pixels).permute(2, 0, 1), CONFIG)

    return run


def torchvision_pipeline(path: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    image = decode_jpeg(read_file(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    return preprocess(image, CONFIG)


def pipelines() -> dict[str, Callable[[str], torch.Tensor]]:
    found = {"pil": today}
    try:
        found["simplejpeg"] = simplejpeg_pipeline(fast=False)
        found["sj-fast"] = simplejpeg_pipeline(fast=True)
    except ImportError:
        print("simplejpeg is not installed: skipped (pip install simplejpeg)")
    found["torchvision"] = torchvision_pipeline
    return found


# ----------------------------------------------------------------- timing --

def prepare(pipeline: Callable[[str], torch.Tensor], path: str) -> torch.Tensor:
    with torch_threads(PREPROCESS_THREADS):  # as ImageDataset prepares one image
        return pipeline(path)


def rate(pipeline: Callable[[str], torch.Tensor], paths: list[str], threads: int) -> float:
    start = time.perf_counter()
    if threads == 1:
        for path in paths:
            prepare(pipeline, path)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda path: prepare(pipeline, path), paths))
    return len(paths) / (time.perf_counter() - start)


def repeated(paths: list[str], count: int) -> list[str]:
    return [paths[i % len(paths)] for i in range(max(count, len(paths)))]


WORKER = """
import json, sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
import PIL, bench_decode as b
paths, threads, out = json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
b.rate(b.today, paths[:8], threads)  # warm-up
rate = b.rate(b.today, paths, threads)
if out:
    torch.save([b.today(p) for p in dict.fromkeys(paths)], out)
print(json.dumps({"rate": rate, "pil": PIL.__version__}))
"""


def child_rate(python: str, paths: list[str], threads: int, out: str = "") -> dict:
    """(a) in a fresh process of ``python``: images per second and its PIL version."""
    result = subprocess.run([python, "-c", WORKER, str(ROOT), json.dumps(paths), str(threads),
                             out], capture_output=True, text=True, check=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(result.stdout.splitlines()[-1])


# ------------------------------------------------------------- comparison --

def differences(reference: list[torch.Tensor], other: list[torch.Tensor]) -> tuple:
    """Largest and mean absolute differences: normalised units, then 0-255 units."""
    std = torch.tensor(CONFIG.std).view(3, 1, 1) * 255
    diff = torch.stack([(a - b).abs() for a, b in zip(reference, other, strict=True)])
    levels = diff * std
    return (float(diff.max()), float(diff.mean()), float(levels.max()), float(levels.mean()))


def main(argv: list[str] | None = None) -> None:
    from skt.bench import format_machine, machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; best kept")
    parser.add_argument("--images", type=int, default=120,
                        help="images per timed run (a set's files, repeated)")
    parser.add_argument("--sets", default="foolbox,500x375,1024x768,3000x2000",
                        help="which sets of files, comma-separated")
    parser.add_argument("--pillow-simd", default="",
                        help="python of a virtual environment with pillow-simd (see above)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    print(format_machine(machine_info()))
    print(f"Pillow {Image.__version__}; 224 px (resize 256, centre crop, normalise); "
          f"img/s, best of {args.repeats} interleaved rounds; ratio = rate / pil's rate")
    runners = pipelines()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        sets = {"foolbox": ("foolbox ImageNet (progressive, 512 px)", foolbox_jpegs),
                "500x375": ("500x375 baseline q90",
                            lambda: make_photos(folder, 24, (500, 375), grain=3)),
                "1024x768": ("1024x768 baseline q90",
                             lambda: make_photos(folder, 12, (1024, 768), grain=3)),
                "3000x2000": ("3000x2000 baseline q90",
                              lambda: make_photos(folder, 6, (3000, 2000), grain=3))}
        for key in args.sets.split(","):
            name, make = sets[key]
            files = make()
            if not files:
                print(f"\n{name}: no files (pip install --no-deps foolbox==3.3.4)")
                continue
            report_set(name, files, runners, args, folder)


def size_of(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def report_set(name: str, files: list[str], runners: dict, args, folder: Path) -> None:
    paths = repeated(files, args.images)
    sizes = sorted({size_of(path) for path in files})
    print(f"\n{name}: {len(files)} files, sizes {', '.join(f'{w}x{h}' for w, h in sizes)}, "
          f"{len(paths)} images per run")
    reference = [today(path) for path in files]
    outputs = {key: [run(path) for path in files] for key, run in runners.items()}
    for run in runners.values():
        rate(run, paths[:8], 1)  # warm-up
    if args.pillow_simd:
        simd_version = child_rate(args.pillow_simd, files, 1, str(folder / "simd.pt"))["pil"]
        outputs["pillow-simd"] = torch.load(folder / "simd.pt", weights_only=True)
    rates = dict.fromkeys([(key, threads) for key in outputs for threads in (1, 2)], 0.0)
    stock = {1: 0.0, 2: 0.0}  # (a) in a child of this interpreter, against pillow-simd's child
    for _ in range(args.repeats):
        for threads in (1, 2):
            for key, run in runners.items():
                rates[key, threads] = max(rates[key, threads], rate(run, paths, threads))
            if args.pillow_simd:  # the two interpreters in turn, each in a fresh child
                rates["pillow-simd", threads] = max(rates["pillow-simd", threads], child_rate(
                    args.pillow_simd, paths, threads)["rate"])
                stock[threads] = max(stock[threads],
                                     child_rate(sys.executable, paths, threads)["rate"])
    print(f"  {'decoder':<12} {'1 thread':>9} {'ratio':>6} {'2 threads':>10} {'ratio':>6}   "
          f"{'max|d| norm':>11} {'mean|d| norm':>12} {'max|d| 0-255':>12} "
          f"{'mean|d| 0-255':>13}")
    for key in outputs:
        base = stock if key == "pillow-simd" else {t: rates["pil", t] for t in (1, 2)}
        one, two = rates[key, 1], rates[key, 2]
        diff = differences(reference, outputs[key])
        print(f"  {key:<12} {one:9.0f} {one / base[1]:5.2f}x {two:10.0f} {two / base[2]:5.2f}x   "
              f"{diff[0]:11.4f} {diff[1]:12.5f} {diff[2]:12.2f} {diff[3]:13.3f}", flush=True)
    if args.pillow_simd:
        print(f"  (pillow-simd {simd_version} in a child process; its ratio is to today's path "
              f"in a child of this interpreter: {stock[1]:.0f} and {stock[2]:.0f} img/s)")


if __name__ == "__main__":
    main()
