"""Extraction throughput from JPEG files: a naive PyTorch loop against skt's engines.

For each backbone, in one run and on the same files:

(a) naive   decode, transform, forward one after another in one thread
            (torchvision transforms, NCHW, ``torch.no_grad``);
(b) torch   skt ``engine="torch"``: channels-last, ``inference_mode``,
            decoding in threads ahead of the network, JPEG draft decoding;
(c) onnx    skt ``engine="onnx"``: the same pipeline on ONNX Runtime;
(d) bf16    skt ``precision="bfloat16"`` (torch autocast), where the CPU has
            native bfloat16 (AVX512-BF16 or AMX), else "-";
(e) int8    skt ``precision="int8"`` (ONNX Runtime static quantisation,
            calibrated in ``fit`` on the first 64 files);

each end to end from the files and, on a second line, the network alone on
tensors made beforehand (the pure-forward ceiling of (b)-(e));

plus the decode-only rate of skt's input pipeline, and the peak RSS of
``transform_into`` a ``.npy`` memmap for 1,000 and 10,000 images (in fresh
processes). ResNet-18 and MobileNet-V3 use random weights (their activations
are then tiny, which does not change their speed here); EfficientNet-Lite0
uses its real ImageNet weights.

Usage::

    python benchmarks/bench_extract.py [--images 256] [--backbones resnet18,...]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from skt import FeatureExtractor
from skt._utils import resolve_num_workers
from skt.backbones import resolve_backbone
from skt.extract import native_bfloat16, onnx_available
from skt.images import as_image_list, iter_batches

WEIGHTS = {"resnet18": None, "mobilenet_v3_large": None, "efficientnet_lite0": "DEFAULT"}


def make_photos(folder: Path, count: int, size=(500, 375), grain: float = 0.0) -> list[str]:
    """Photo-like JPEGs (quality 90): random crops of scikit-image's sample photos, resized,
    with Gaussian ``grain`` (standard deviation in 0-255 levels) as a camera sensor adds."""
    from skimage import data

    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(),
               data.immunohistochemistry(), data.hubble_deep_field()]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        photo = sources[i % len(sources)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1)), int(w * rng.uniform(0.6, 1))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(photo[top:top + ch, left:left + cw]).resize(size)
        if grain:
            noisy = np.asarray(crop, dtype=np.float32) + rng.normal(0, grain, (*size[::-1], 3))
            crop = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        path = folder / f"photo{size[0]}x{size[1]}_{i:05d}.jpg"
        crop.save(path, quality=90)
        paths.append(str(path))
    return paths


def timed(function, count: int) -> float:
    start = time.perf_counter()
    function()
    return count / (time.perf_counter() - start)


def best_rates(runners: dict, counts: dict, repeats: int) -> dict:
    """Best img/s of each runner over ``repeats`` rounds, run interleaved so that
    a burst of load on this shared machine hits all of them alike."""
    rates = {key: 0.0 for key in runners}
    for _ in range(repeats):
        for key, run in runners.items():
            rates[key] = max(rates[key], timed(run, counts[key]))
    return rates


def naive_loop(name: str, paths: list[str], batch_size: int):
    """The baseline: decode, transform, forward, one after another, in one thread."""
    backbone = resolve_backbone(name, WEIGHTS[name])
    model = backbone.model.eval()
    config = backbone.preprocessing
    transform = T.Compose([
        T.Resize(config.resize_size, interpolation=T.InterpolationMode(config.interpolation)),
        T.CenterCrop(config.crop_size), T.ToTensor(), T.Normalize(config.mean, config.std)])

    def run():
        with torch.no_grad():
            for start in range(0, len(paths), batch_size):
                batch = torch.stack([transform(Image.open(p).convert("RGB"))
                                     for p in paths[start:start + batch_size]])
                model(batch)

    return run


def skt_run(name: str, engine: str, paths: list[str], batch_size: int,
            precision: str = "float32"):
    extractor = FeatureExtractor(name, weights=WEIGHTS[name], engine=engine,
                                 batch_size=batch_size, precision=precision).fit(paths[:64])
    extractor.transform(paths[:batch_size])  # warm-up
    return (lambda: extractor.transform(paths)), extractor


def ceiling_run(extractor, size: int, batch_size: int, batches: int):
    """The engine's forward pass alone, on tensors made beforehand: the ceiling."""
    engine = extractor._get_runtime().engine
    x = torch.randn(batch_size, 3, size, size)
    engine(x)
    return lambda: [engine(x) for _ in range(batches)]


def decode_rate(paths: list[str], batch_size: int) -> float:
    config = resolve_backbone("resnet18", None).preprocessing
    images = as_image_list(paths)
    return timed(lambda: list(iter_batches(images, config, batch_size,
                                           resolve_num_workers(None))), len(paths))


RSS_SCRIPT = """
import resource, sys, numpy as np
from skt import FeatureExtractor
paths = open(sys.argv[1]).read().split()
n = int(sys.argv[2])
paths = [paths[i % len(paths)] for i in range(n)]
extractor = FeatureExtractor("mobilenet_v3_small", weights=None, image_size=64, random_state=0,
                             batch_size=64).fit(paths[:1])
out = np.lib.format.open_memmap(sys.argv[3], mode="w+", dtype=np.float32,
                                shape=(n, extractor.n_features_out_))
extractor.transform_into(paths, out)
# VmHWM, unlike ru_maxrss, starts afresh at exec rather than carrying the parent's peak.
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(int(status.split()[0]))
"""


def peak_rss(paths: list[str], count: int, folder: Path) -> float:
    listing = folder / "paths.txt"
    listing.write_text("\n".join(paths))
    result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(listing), str(count),
                             str(folder / f"features{count}.npy")],
                            capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1]) / 1024  # kB -> MiB


def main(argv=None) -> None:
    from skt.bench import format_machine, machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbones", default="resnet18,mobilenet_v3_large,efficientnet_lite0")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; best kept")
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args(argv)

    print(format_machine(machine_info()))
    print(f"{resolve_num_workers(None)} decoding threads, batch {args.batch_size}, 224 px, "
          f"img/s, best of {args.repeats} interleaved rounds")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        paths = make_photos(folder, args.images)
        print(f"{len(paths)} JPEG files of 500x375 px; skt decode+resize+normalise only: "
              f"{decode_rate(paths, args.batch_size):.0f} img/s on "
              f"{resolve_num_workers(None)} threads")
        bf16 = native_bfloat16(torch.device("cpu"))
        int8 = onnx_available()
        columns = ["naive", "torch", "onnx", "bf16", "int8"]
        print(f"{'backbone':22s} {'weights':8s} {'from':8s} "
              + " ".join(f"{key:>7s}" for key in columns)
              + f" {'default/naive':>14s} {'int8/naive':>11s} {'onnx/tensors':>13s} "
                f"{'int8/tensors':>13s}")
        for name in args.backbones.split(","):
            extractors = {"torch": skt_run(name, "torch", paths, args.batch_size),
                          "onnx": skt_run(name, "onnx", paths, args.batch_size)}
            if bf16:
                extractors["bf16"] = skt_run(name, "torch", paths, args.batch_size, "bfloat16")
            if int8:  # calibrated on the first 64 files
                extractors["int8"] = skt_run(name, "auto", paths, args.batch_size, "int8")
            batches = max(1, len(paths) // args.batch_size)
            runners = {("files", "naive"): naive_loop(name, paths, args.batch_size)}
            for key, (run, extractor) in extractors.items():
                runners["files", key] = run
                runners["tensors", key] = ceiling_run(extractor, 224, args.batch_size, batches)
            counts = {key: len(paths) if key[0] == "files" else batches * args.batch_size
                      for key in runners}
            rates = best_rates(runners, counts, args.repeats)
            default = FeatureExtractor(name, weights=WEIGHTS[name]).fit(paths[:1]).engine_
            weights = "real" if WEIGHTS[name] else "random"
            for source in ("files", "tensors"):
                cells = " ".join(format(rates[source, key], "7.1f") if (source, key) in rates
                                 else f"{'-':>7s}" for key in columns)
                line = f"{name:22s} {weights:8s} {source:8s} {cells}"
                if source == "files":
                    naive = rates["files", "naive"]
                    line += f" {rates['files', default] / naive:13.2f}x"
                    line += (f" {rates['files', 'int8'] / naive:10.2f}x" if int8
                             else f" {'-':>11s}")
                    line += f" {rates['files', 'onnx'] / rates['tensors', 'onnx']:12.2f}x"
                    line += (f" {rates['files', 'int8'] / rates['tensors', 'int8']:12.2f}x"
                             if int8 else f" {'-':>13s}")
                print(line, flush=True)
            if int8:
                calibration = extractors["int8"][1].calibration_
                print(f"{'':22s} int8: {calibration['float_convs']} leading convolutions in "
                      f"float32, feature cosine to float32 {calibration['cosine']:.4f} on its "
                      "64 calibration files")
        if not args.skip_rss:
            small, large = peak_rss(paths, 1000, folder), peak_rss(paths, 10000, folder)
            print(f"peak RSS, transform_into a .npy memmap (mobilenet_v3_small, 64 px): "
                  f"1,000 images {small:.0f} MiB, 10,000 images {large:.0f} MiB "
                  f"(ratio {large / small:.3f})")
    print(f"benchmark process peak RSS: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
