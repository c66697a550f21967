"""Fine-tune a classifier on an image folder, in one process or several: ``python -m skt.train``.

The folder holds one subfolder per class (``photos/cat/1.jpg``,
``photos/dog/2.jpg``, ...); the fitted :class:`skt.FineTuneClassifier` is
written with :func:`skt.save` (``-o model.skt``) or pickled (``-o model.pkl``)::

    python -m skt.train photos/ -o model.skt --backbone resnet50 --max-iter 6
    torchrun --nproc-per-node 2 -m skt.train photos/ -o model.skt --checkpoint fit.ckpt

Under ``torchrun`` every process lists the folder, decodes and trains on its
piece of each batch (``gloo`` on the CPU, ``nccl`` on CUDA, one GPU per
process), and rank 0 writes the checkpoint and the result, printing one
line. ``--batch-size`` is the global batch, so the result does not depend
on the number of processes; the file loads with ``skt.load`` (or pickle)
into a classifier that predicts in a single process. ``--checkpoint`` must
be on a filesystem every process can read.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import torch.distributed as dist

from skt._utils import atomic_open, expand_path
from skt.finetune import FineTuneClassifier
from skt.images import load_image_folder
from skt.persist import save

__all__ = ["main"]

_SAVED = {".skt": "skt.save", ".pkl": "pickle", ".pickle": "pickle"}


def _freeze(value: str):
    """``auto``, ``all``, ``none``, a stage count, or comma-separated fnmatch patterns."""
    if value.lower() == "none":
        return None
    if value.isdigit():
        return int(value)
    if value in ("auto", "all"):
        return value
    patterns = [pattern for pattern in value.split(",") if pattern]
    return patterns[0] if len(patterns) == 1 else patterns


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m skt.train``."""
    parser = argparse.ArgumentParser(
        prog="python -m skt.train",
        description="Fine-tune a FineTuneClassifier on a folder of class subfolders and write "
                    "it; under torchrun, train across the processes.")
    parser.add_argument("folder", help="image folder, one subfolder per class")
    parser.add_argument("-o", "--output", required=True,
                        help="where to write the fitted classifier: .skt (skt.save) or .pkl")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="DEFAULT",
                        help="DEFAULT, a weights name, a state-dict path, or none")
    parser.add_argument("--max-iter", type=int, default=6, help="epochs (default: 6)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="global batch, split between the processes (default: 32)")
    parser.add_argument("--image-size", type=int, help="crop size (default: the weights')")
    parser.add_argument("--freeze", type=_freeze, default="auto",
                        help="auto, all, none, a stage count, or comma-separated patterns")
    parser.add_argument("--augment", choices=("none", "flip", "dihedral", "standard"),
                        default="none")
    parser.add_argument("--batchnorm", choices=("auto", "fixed", "batch"), default="auto",
                        help="statistics of BatchNorm layers that train (default: auto)")
    parser.add_argument("--checkpoint", help="checkpoint file, to resume an interrupted fit")
    parser.add_argument("--random-state", type=int, help="seed: the same one, the same model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("-v", "--verbose", action="store_true", help="progress per epoch")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Fit, write the result on rank 0, and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    output = expand_path(args.output)
    if output.suffix.lower() not in _SAVED:
        parser.error(f"-o {args.output}: the suffix says how to write it: .skt (skt.save, no "
                     "pickle) or .pkl (pickle).")
    if not output.parent.is_dir():
        parser.error(f"-o {args.output}: {str(output.parent)!r} is not a folder.")
    try:
        paths, labels = load_image_folder(expand_path(args.folder))
        clf = FineTuneClassifier(
            args.backbone, None if args.weights.lower() == "none" else args.weights,
            image_size=args.image_size, max_iter=args.max_iter, batch_size=args.batch_size,
            freeze=args.freeze, batchnorm=args.batchnorm,
            augment=None if args.augment == "none" else args.augment,
            checkpoint=args.checkpoint, device=args.device, random_state=args.random_state,
            verbose=int(args.verbose))
        clf.fit(paths, labels)
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return 0
        _write(clf, output)
    except (ValueError, TypeError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {output} with {_SAVED[output.suffix.lower()]}: {args.backbone} fine-tuned "
          f"on {len(paths)} images of {len(clf.classes_)} classes by {clf.world_size_} "
          f"process{'es' if clf.world_size_ > 1 else ''}")
    return 0


def _write(clf: FineTuneClassifier, output: Path) -> None:
    if _SAVED[output.suffix.lower()] == "skt.save":
        save(clf, output)
        return
    with atomic_open(output) as handle:
        pickle.dump(clf, handle)


if __name__ == "__main__":
    sys.exit(main())
