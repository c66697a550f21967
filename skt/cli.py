"""The ``skt`` command line: extract features, list backbones and layers, manage the cache.

Exit statuses:

0
    Success, ``--help`` and ``--version`` included.
1
    The command failed: one line on stderr, ``skt: error: <what and what to
    do>``, and no traceback.
2
    A usage error (unknown option, missing argument, invalid choice):
    argparse's usage line, then ``skt: error: ...`` (``skt extract: error:
    ...`` for a command's own arguments); the convention of every argparse
    program.
130
    Interrupted with Ctrl-C (128 + SIGINT).
141
    The reader of the output went away (``skt backbones | head -1``): nothing
    more is printed, and the status is the one a shell reports for ``cat``,
    ``seq`` or ``grep`` killed by SIGPIPE in the same place (128 + SIGPIPE).
    Not 0, because a closed pipe can stop a command before its work is done:
    in ``skt extract ... -o f.npy 2>&1 | head -1`` the first progress line
    nobody reads ends the extraction, and 0 would vouch for an ``f.npy``
    still mostly zeros. Not 1, which promises a message. A shell takes a
    pipeline's status from its last command, so ``skt backbones | head -1``
    succeeds unless ``set -o pipefail`` asks otherwise, as for those tools.

``--help``, ``--version`` and ``cache`` import neither torch nor scikit-learn,
nor numpy for the first two: each command imports what it needs when it runs,
so start-up stays a fraction of a second (``tests/test_cli.py`` checks the
imports).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from skt._version import __version__

__all__ = ["main"]


class CommandError(Exception):
    """A user-facing failure, printed as one line."""


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def _has_class_folders(folder: Path) -> bool:
    from skt.images import list_image_files

    return any(p.is_dir() and list_image_files(p) for p in folder.iterdir())


def collect_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """Image paths (and class labels) from files, globs and directories.

    A directory with class subfolders (``root/<class>/<image>``) gives labels;
    a flat directory gives its image files. Labels are returned only when
    every input was a class-subfolder directory.
    """
    from skt.images import list_image_files, load_image_folder

    paths: list[str] = []
    labels: list[str] = []
    all_labelled = True
    for entry in inputs:
        matches = sorted(glob.glob(entry)) if glob.has_magic(entry) else [entry]
        if not matches:
            raise CommandError(f"{entry!r} matches no file.")
        for match in matches:
            path = Path(match)
            if path.is_dir() and _has_class_folders(path):
                found, found_labels = load_image_folder(path)
                paths += found
                labels += found_labels.tolist()
            elif path.is_dir():
                found = list_image_files(path)
                if not found:
                    raise CommandError(f"{match!r} holds no image files.")
                paths += found
                all_labelled = False
            elif path.is_file():
                paths.append(str(path))
                all_labelled = False
            else:
                raise CommandError(f"{match!r} does not exist.")
    return paths, (labels if all_labelled and labels else None)


def _extractor(args: argparse.Namespace):
    from skt import FeatureExtractor

    layers = args.layers.split(",") if args.layers else None
    weights = None if args.weights.lower() == "none" else args.weights
    return FeatureExtractor(
        backbone=args.backbone, weights=weights, layers=layers, pooling=args.pooling,
        image_size=args.image_size, batch_size=args.batch_size, device=args.device,
        num_workers=args.num_workers, cache=args.cache, engine=args.engine, verbose=1,
    )


def cmd_extract(args: argparse.Namespace) -> None:
    import numpy as np

    output = Path(args.output)
    if output.suffix not in (".npy", ".npz"):
        raise CommandError(f"-o {args.output!r}: the output must end in .npy or .npz.")
    paths, labels = collect_inputs(args.inputs)
    extractor = _extractor(args).fit(paths)
    output.parent.mkdir(parents=True, exist_ok=True)
    shape = (len(paths), extractor.n_features_out_)
    if output.suffix == ".npy":
        features = np.lib.format.open_memmap(output, mode="w+", dtype=np.float32, shape=shape)
        extractor.transform_into(paths, features)
        features.flush()
        del features
        output.with_suffix(".paths.txt").write_text("\n".join(paths) + "\n")
        if labels is not None:
            output.with_suffix(".labels.txt").write_text("\n".join(labels) + "\n")
    else:
        _write_npz(output, extractor, paths, labels, shape)
    print(f"wrote {shape[0]} x {shape[1]} features ({extractor.engine_} engine) to {output}",
          file=sys.stderr)


def _write_npz(output: Path, extractor, paths, labels, shape) -> None:
    """Features go through an on-disk .npy first, so memory stays flat."""
    import numpy as np

    with tempfile.TemporaryDirectory(dir=output.parent) as scratch:
        staged = Path(scratch) / "features.npy"
        features = np.lib.format.open_memmap(staged, mode="w+", dtype=np.float32, shape=shape)
        extractor.transform_into(paths, features)
        features.flush()
        del features
        partial = output.with_name(f".{output.name}.partial")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            archive.write(staged, "features.npy")
            for name, values in (("paths", paths), ("labels", labels)):
                if values is not None:
                    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.asarray(values))
        os.replace(partial, output)


def cmd_backbones(args: argparse.Namespace) -> None:
    from skt.backbones import list_backbones, weights_available_offline

    for name in list_backbones():
        offline = "weights on disk" if weights_available_offline(name) else "download needed"
        print(f"{name:28s} {offline}")


def cmd_layers(args: argparse.Namespace) -> None:
    from skt.backbones import list_layers

    print("\n".join(list_layers(args.backbone)))


def cmd_cache(args: argparse.Namespace) -> None:
    from skt.cache import cache_info, clear_cache

    if args.action == "clear":
        freed = clear_cache(args.path, max_bytes=args.max_bytes)
        print(f"freed {_human(freed)} in {args.path}")
        return
    info = cache_info(args.path)
    graphs = f", {info['graphs']} exported graphs" if info["graphs"] else ""
    print(f"{info['path']}: {info['entries']} entries{graphs}, {_human(info['bytes'])}")
    for config in info["configs"]:
        description = config["description"]
        preprocessing = description.get("preprocessing", {})
        print(f"  {config['key']}  {description.get('backbone')}  "
              f"{description.get('weights')}  {preprocessing.get('crop_size')} px  "
              f"{config['entries']} entries  {_human(config['bytes'])}")


def cmd_demo(args: argparse.Namespace) -> None:
    from skt.bench.demo import run_demo

    run_demo(quick=args.quick, output=args.output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skt", description="Pretrained CNN features for scikit-learn.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    extract = commands.add_parser(
        "extract", help="features of image files to .npy/.npz",
        description="Extract features of image files. A directory in class-subfolder layout "
                    "also writes labels; .npz keeps features, paths and labels together.")
    extract.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="image files, globs or directories")
    extract.add_argument("-o", "--output", required=True, help="features.npy or features.npz")
    extract.add_argument("--backbone", default="efficientnet_lite0")
    extract.add_argument("--weights", default="DEFAULT",
                         help="DEFAULT, a weights name, a state-dict path, or none")
    extract.add_argument("--layers", help="comma-separated layer names (default: penultimate)")
    extract.add_argument("--pooling", default="avg",
                         choices=["avg", "max", "gem", "avgmax", "flatten"])
    extract.add_argument("--image-size", type=int)
    extract.add_argument("--batch-size", type=int, default=32)
    extract.add_argument("--device", default="auto")
    extract.add_argument("--num-workers", type=int, default=None,
                         help="decoding processes (default: one per core, up to 4)")
    extract.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx"])
    extract.add_argument("--cache", help="feature cache directory")
    extract.set_defaults(run=cmd_extract)

    backbones = commands.add_parser("backbones", help="list backbone names")
    backbones.set_defaults(run=cmd_backbones)

    layers = commands.add_parser("layers", help="list the layer names of a backbone")
    layers.add_argument("backbone")
    layers.set_defaults(run=cmd_layers)

    cache = commands.add_parser("cache", help="show or clear a feature cache")
    cache.add_argument("action", choices=["info", "clear"])
    cache.add_argument("path")
    cache.add_argument("--max-bytes", type=int,
                       help="with clear: delete oldest entries down to this size")
    cache.set_defaults(run=cmd_cache)

    demo = commands.add_parser("demo", help="compare heads and fine-tuning on real images")
    demo.add_argument("--quick", action="store_true", help="a small subset, in under 2 minutes")
    demo.add_argument("--output", default="demo-results")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``skt`` and ``python -m skt``; returns the exit status (see above)."""
    try:
        status = _parse_and_run(argv)
        sys.stdout.flush()  # so a closed pipe is met here, not while Python exits
    except BrokenPipeError:
        _discard_unwritable_output()
        return 141
    except (CommandError, ValueError, TypeError, OSError, ImportError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"skt: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("skt: interrupted", file=sys.stderr)
        return 130
    return status


def _parse_and_run(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: 0 after --help and --version, 2 for usage errors
        return int(exc.code or 0)
    args.run(args)
    return 0


def _discard_unwritable_output() -> None:
    """Point stdout and stderr, if their pipe is closed, at os.devnull.

    What is still buffered for a closed pipe would otherwise fail again when
    Python flushes it at exit: "Exception ignored ... BrokenPipeError" and
    status 120 (the recipe in
    https://docs.python.org/3/library/signal.html#note-on-sigpipe).
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
