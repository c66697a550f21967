"""skt.cli: the commands, their exit statuses, start-up imports and closed pipes."""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skt import __version__
from skt.cli import CommandError, collect_inputs, main, read_jsonl

TINY_ARGS = ["--backbone", "resnet18", "--weights", "none", "--random-state", "0",
             "--image-size", "32", "--engine", "torch"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(capsys, *argv):
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---------------------------------------------------------------- extract --

def test_extract_class_folder_to_npz(image_folder, tmp_path, capsys):
    output = tmp_path / "out" / "features.npz"
    status, _, err = run(capsys, "extract", str(image_folder), "-o", str(output), *TINY_ARGS)
    assert status == 0, err
    with np.load(output) as saved:
        assert saved["features"].shape == (12, 512) and saved["features"].dtype == np.float32
        assert saved["labels"].tolist() == ["bright"] * 6 + ["dark"] * 6
        assert saved["paths"].tolist() == [str(image_folder / label / f"{i}.png")
                                           for label in ("bright", "dark") for i in range(6)]
    assert "wrote 12 x 512 features" in err


def test_extract_files_and_globs_to_npy(image_files, tmp_path, capsys):
    import torch
    import torchvision

    weights = tmp_path / "weights.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    output = tmp_path / "features.npy"
    pattern = str(tmp_path / "img[0-3].png")
    status, _, err = run(capsys, "extract", pattern, image_files[7], "-o", str(output),
                         "--layers", "layer2,layer3", "--pooling", "max", *TINY_ARGS,
                         "--weights", str(weights))
    assert status == 0, err
    features = np.load(output, mmap_mode="r")
    assert features.shape == (5, 128 + 256)
    assert read_jsonl(tmp_path / "features.paths.jsonl") == [*image_files[:4], image_files[7]]
    assert not (tmp_path / "features.labels.jsonl").exists()  # plain files have no labels

    from skt import FeatureExtractor

    expected = FeatureExtractor("resnet18", weights=str(weights), image_size=32, engine="torch",
                                layers=["layer2", "layer3"], pooling="max"
                                ).fit(image_files).transform(image_files[:4])
    np.testing.assert_allclose(features[:4], expected, rtol=1e-5, atol=1e-6)


def test_extract_int8_calibrates_on_the_inputs(image_files, tmp_path, capsys):
    from skt import FeatureExtractor

    output = tmp_path / "features.npy"
    args = [arg if arg != "torch" else "auto" for arg in TINY_ARGS]
    status, _, err = run(capsys, "extract", *image_files, "-o", str(output), *args,
                         "--precision", "int8")
    assert status == 0, err
    expected = FeatureExtractor("resnet18", weights=None, random_state=0, image_size=32,
                                precision="int8").fit(image_files).transform(image_files)
    np.testing.assert_array_equal(np.load(output), expected)  # the same calibration


def test_extract_files_to_npz_keeps_their_order_without_labels(image_files, tmp_path, capsys):
    output = tmp_path / "features.npz"
    status, _, err = run(capsys, "extract", *image_files[:3], "-o", str(output), *TINY_ARGS)
    assert status == 0, err
    with np.load(output) as saved:
        assert saved["paths"].tolist() == image_files[:3]
        assert "labels" not in saved.files
    assert not list(tmp_path.glob(".*"))  # no staging file is left


def test_collect_inputs_refuses_missing_paths_and_empty_folders(tmp_path):
    missing, pattern = str(tmp_path / "missing"), str(tmp_path / "*.jpg")
    with pytest.raises(CommandError, match=re.escape(f"{missing!r} does not exist.")):
        collect_inputs([missing])
    with pytest.raises(CommandError, match=re.escape(f"{pattern!r} matches no file.")):
        collect_inputs([pattern])
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(CommandError, match=re.escape(f"{str(tmp_path)!r} holds no image files.")):
        collect_inputs([str(tmp_path)])


# ------------------------------------------------------ outputs of one run --

def _files(folder):
    """Names of the files in ``folder``, hidden ones included."""
    return sorted(path.name for path in folder.iterdir())


def _broken(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    return str(broken)


def test_extract_replaces_every_output_of_an_earlier_run(image_folder, image_files, tmp_path,
                                                          capsys):
    output = tmp_path / "out" / "f.npy"
    assert run(capsys, "extract", str(image_folder), "-o", str(output), *TINY_ARGS)[0] == 0
    assert _files(output.parent) == ["f.labels.jsonl", "f.npy", "f.paths.jsonl"]
    (output.parent / "f.paths.txt").write_text("written by an earlier version\n")
    status, _, err = run(capsys, "extract", *image_files[:3], "-o", str(output), *TINY_ARGS)
    assert status == 0, err
    # files without classes: no labels, and nothing left from the run before
    assert _files(output.parent) == ["f.npy", "f.paths.jsonl"]
    assert np.load(output).shape == (3, 512)
    assert read_jsonl(output.parent / "f.paths.jsonl") == image_files[:3]


def test_failed_extract_keeps_the_earlier_output_then_resumes(image_files, tmp_path, capsys):
    """Image 6 fails: f.npz stays the earlier run's; once fixed, the same command resumes."""
    output = tmp_path / "out" / "f.npz"
    args = [*TINY_ARGS, "--batch-size", "2"]
    assert run(capsys, "extract", *image_files[:2], "-o", str(output), *args)[0] == 0
    earlier = output.read_bytes()
    inputs = [*image_files[:6], _broken(tmp_path), image_files[7]]
    status, _, err = run(capsys, "extract", *inputs, "-o", str(output), *args)
    assert status == 1
    assert err.splitlines()[-1].startswith(f"skt: error: Image 6 ({inputs[6]!r}) cannot be read")
    assert output.read_bytes() == earlier
    done = json.loads((output.parent / ".f.npz.progress").read_text())["rows"]
    assert done in (2, 4, 6)  # whole batches

    shutil.copy(image_files[6], inputs[6])
    status, _, err = run(capsys, "extract", *inputs, "-o", str(output), *args)
    assert status == 0, err
    assert f"skt: resuming {output} from image {done} of 8\n" in err
    assert re.findall(r"\| (\d+)/8 \[", err) == [str(done), "8"]  # one bar, drawn twice off a tty
    assert _files(output.parent) == ["f.npz"]
    reference = tmp_path / "reference.npz"
    assert run(capsys, "extract", *inputs, "-o", str(reference), *args)[0] == 0
    assert output.read_bytes() == reference.read_bytes()


@pytest.mark.parametrize("change", ["other files", "a file rewritten", "other settings"])
def test_a_different_job_starts_over(change, image_files, images, tmp_path, capsys):
    output = tmp_path / "f.npy"
    inputs = [*image_files[:4], _broken(tmp_path)]
    args = [*TINY_ARGS, "--batch-size", "2"]
    assert run(capsys, "extract", *inputs, "-o", str(output), *args)[0] == 1
    assert (tmp_path / ".f.npy.progress").exists() and not output.exists()
    inputs = inputs[:4]
    if change == "other files":
        inputs = image_files[4:]
    elif change == "a file rewritten":
        Image.fromarray(images[7]).save(inputs[0])
    else:
        args += ["--pooling", "max"]
    status, _, err = run(capsys, "extract", *inputs, "-o", str(output), *args)
    assert status == 0, err
    assert "resuming" not in err
    assert _files(tmp_path).count(".f.npy.progress") == 0
    from skt import FeatureExtractor

    pooling = "max" if change == "other settings" else "avg"
    expected = FeatureExtractor("resnet18", weights=None, image_size=32, engine="torch",
                                random_state=0, pooling=pooling).fit(inputs).transform(inputs)
    np.testing.assert_allclose(np.load(output), expected, rtol=1e-5, atol=1e-6)


def interrupt_the_second_chunk(patch) -> list[int]:
    """Make ``skt extract``'s second ``transform_into`` call raise KeyboardInterrupt
    (Ctrl-C); returns the list of each call's number of images."""
    from skt import FeatureExtractor

    calls = []
    transform_into = FeatureExtractor.transform_into

    def interrupted(self, X, out):
        calls.append(len(X))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return transform_into(self, X, out)

    patch.setattr(FeatureExtractor, "transform_into", interrupted)
    return calls


def test_ctrl_c_keeps_the_work_done(image_files, tmp_path, capsys, monkeypatch):
    calls = interrupt_the_second_chunk(monkeypatch)
    output = tmp_path / "f.npy"
    status, _, err = run(capsys, "extract", *image_files, "-o", str(output), *TINY_ARGS,
                         "--batch-size", "2")
    assert status == 130
    assert err.splitlines()[-1] == ("skt: interrupted; 2 of 8 images are done; the same "
                                    "command resumes")
    assert not output.exists() and calls[0] == 2


def test_images_skipped_before_an_interruption_stay_listed(image_files, tmp_path, capsys,
                                                            monkeypatch):
    inputs = [image_files[0], _broken(tmp_path), *image_files[1:6]]
    output = tmp_path / "f.npy"
    argv = ["extract", *inputs, "-o", str(output), *TINY_ARGS, "--batch-size", "2",
            "--on-error", "skip"]
    with monkeypatch.context() as patch:
        interrupt_the_second_chunk(patch)
        assert run(capsys, *argv)[0] == 130
    status, _, err = run(capsys, *argv)
    assert status == 0, err
    assert "skt: resuming" in err and "skt: skipped 1 of 7 images" in err
    assert [entry["index"] for entry in read_jsonl(tmp_path / "f.skipped.jsonl")] == [1]
    assert np.isnan(np.load(output)[1]).all()


def test_warnings_are_one_line_each_once(image_files, tmp_path, capsys, monkeypatch):
    import warnings

    from skt import FeatureExtractor

    transform_into = FeatureExtractor.transform_into

    def warning(self, X, out):
        warnings.warn("the device is slow\ntoday", RuntimeWarning, stacklevel=1)
        return transform_into(self, X, out)

    monkeypatch.setattr(FeatureExtractor, "transform_into", warning)
    status, _, err = run(capsys, "extract", *image_files, "-o", str(tmp_path / "f.npy"),
                         *TINY_ARGS, "--batch-size", "2")
    assert status == 0, err
    assert err.count("skt: warning: ") == 1 and "skt: warning: the device is slow today\n" in err


# ------------------------------------------------------------- file names --

ODD_NAMES = ["new\nline.png", "tab\there.png", " two  spaces .png", "ünïcødé 画像.png",
             os.fsdecode(b"bytes \xff\xfe.png"), 'quote " back\\slash.png']
ODD_CLASSES = ["plain", os.fsdecode(b"odd\nclass \xff")]


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_any_file_name_round_trips(suffix, images, tmp_path, capsys):
    root = tmp_path / "in"
    for label in ODD_CLASSES:
        (root / label).mkdir(parents=True)
        for name, pixels in zip(ODD_NAMES, images, strict=False):
            Image.fromarray(pixels).save(root / label / name)
    expected_paths, expected_labels = collect_inputs([str(root)])
    assert len(expected_paths) == 12 and set(expected_labels) == set(ODD_CLASSES)
    output = tmp_path / f"f{suffix}"
    status, _, err = run(capsys, "extract", str(root), "-o", str(output), *TINY_ARGS)
    assert status == 0, err
    if suffix == ".npy":
        features = np.load(output)
        for kind in ("paths", "labels"):
            assert output.with_suffix(f".{kind}.jsonl").read_bytes().isascii()
        paths = read_jsonl(output.with_suffix(".paths.jsonl"))
        labels = read_jsonl(output.with_suffix(".labels.jsonl"))
    else:
        with np.load(output) as saved:
            features, paths, labels = (saved[k].tolist() for k in ("features", "paths", "labels"))
    assert (paths, labels) == (expected_paths, expected_labels)
    assert len(features) == 12
    assert {os.fsencode(Path(path).name) for path in paths} == {os.fsencode(name)
                                                                for name in ODD_NAMES}
    assert all(Path(path).is_file() for path in paths)


# --------------------------------------------------------------- on error --

@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_on_error_skip_gives_nan_rows_and_lists_them(suffix, image_files, tmp_path, capsys):
    inputs = [image_files[0], _broken(tmp_path), image_files[1]]
    output = tmp_path / "out" / f"f{suffix}"
    status, _, err = run(capsys, "extract", *inputs, "-o", str(output), *TINY_ARGS,
                         "--on-error", "skip")
    assert status == 0, err
    where = (output.with_suffix(".skipped.jsonl") if suffix == ".npy"
             else f"the 'skipped' array of {output}")
    assert err.splitlines()[-2] == (f"skt: skipped 1 of 3 images that could not be read; "
                                    f"their rows are NaN and {where} lists them")
    assert "Warning" not in err
    if suffix == ".npy":
        features = np.load(output)
        skipped = read_jsonl(where)
    else:
        with np.load(output) as saved:
            features = saved["features"]
            skipped = [dict(zip(("index", "path", "message"), row, strict=True))
                       for row in saved["skipped"].tolist()]
    assert np.isnan(features[1]).all() and not np.isnan(features[[0, 2]]).any()
    [entry] = skipped
    assert (entry["index"], entry["path"]) == (1, inputs[1])
    assert entry["message"].startswith(f"Image 1 ({inputs[1]!r}) cannot be read")

    # nothing to skip: an empty list, in place of the earlier one
    status, _, err = run(capsys, "extract", *image_files[:2], "-o", str(output), *TINY_ARGS,
                         "--on-error", "skip")
    assert status == 0 and "skipped" not in err
    if suffix == ".npy":
        assert read_jsonl(where) == []
    else:
        with np.load(output) as saved:
            assert saved["skipped"].shape == (0,)


def test_random_init_with_a_seed_hits_the_cache(image_files, tmp_path, capsys):
    from skt.cache import cache_info

    cache = tmp_path / "cache"
    args = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--engine",
            "torch", "--cache", str(cache)]
    first, second, unseeded = (tmp_path / f"{name}.npy" for name in ("a", "b", "c"))
    assert run(capsys, "extract", *image_files, "-o", str(first), *args, "--random-state", "0",
               )[0] == 0
    assert cache_info(cache)["entries"] == 8
    assert run(capsys, "extract", *image_files, "-o", str(second), *args, "--random-state", "0",
               )[0] == 0
    info = cache_info(cache)
    assert (info["entries"], len(info["configs"])) == (8, 1)
    np.testing.assert_array_equal(np.load(first), np.load(second))
    # without a seed, every run draws other weights: nothing to reuse
    assert run(capsys, "extract", *image_files, "-o", str(unseeded), *args)[0] == 0
    assert cache_info(cache)["entries"] == 16


# ------------------------------------------------------------ exit status --

@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["extract", "/no/such/file.png", "-o", "x.npy"], "'/no/such/file.png' does not exist"),
        (["extract", "{files}", "-o", "x.csv"], "must end in .npy or .npz"),
        (["extract", "{files}", "-o", "{out}", "--backbone", "resnet_18"],
         "Unknown backbone 'resnet_18'. Close matches: ['resnet18'"),
        (["layers", "vgg"], "Unknown backbone 'vgg'"),
        (["extract", "{broken}", "-o", "{out}", *TINY_ARGS], "cannot be read as an image"),
        (["extract", "{bomb}", "-o", "{out}", *TINY_ARGS], "decompression bomb"),
        (["cache", "info", "{missing}"], "'{missing}' does not exist."),
        (["cache", "clear", "{files}"], "'{files}' is not a directory."),
    ],
)
def test_errors_are_one_line_without_traceback(argv, message, image_files, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(30_000, 30_000))
    names = {"files": image_files[0], "out": tmp_path / "o.npy", "broken": broken, "bomb": bomb,
             "missing": tmp_path / "missing"}
    argv = [a.format(**names) for a in argv]
    message = message.format(**names)
    status, _, err = run(capsys, *argv)
    assert status == 1
    last = err.rstrip("\n").split("\n")[-1]  # after any progress bar
    assert last.startswith("skt: error: ") and message in last
    assert err.count("skt: error") == 1 and "Traceback" not in err


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG file whose header claims ``width`` x ``height`` pixels, with no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("error", [Image.DecompressionBombError("Image size exceeds limit"),
                                   RuntimeError("the device went away")])
def test_any_exception_of_the_extractor_is_one_line(error, image_files, tmp_path, capsys,
                                                     monkeypatch):
    from skt import FeatureExtractor

    def fail(self, X, out):
        raise error

    monkeypatch.setattr(FeatureExtractor, "transform_into", fail)
    status, _, err = run(capsys, "extract", *image_files, "-o", str(tmp_path / "f.npy"),
                         *TINY_ARGS)
    assert status == 1
    assert err.splitlines()[-1] == f"skt: error: {type(error).__name__}: {error}"
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--device", "bogus"], "--device bogus is not a torch device; use 'auto', 'cpu', "),
        (["--device", "cuda:7"], "--device cuda:7 is not available on this machine; use "
                                 "--device auto or 'cpu'."),
        (["--layers", "layer3,layer9"], "Unknown layer 'layer9'. Close matches: "),
        (["--layers", "layer9"], "'skt layers resnet18' lists all "),
        (["--image-size", "8"], "--image-size must be an int in the range [16, inf); got 8."),
        (["--weights", "missing.pth"], "--weights missing.pth: no such file."),
        (["--random-state", "4294967296"], "--random-state must be "),
    ],
)
def test_errors_speak_of_options(options, message, image_files, tmp_path, capsys):
    status, _, err = run(capsys, "extract", *image_files[:2], "-o", str(tmp_path / "o.npy"),
                         *TINY_ARGS, *options)
    assert status == 1
    last = err.splitlines()[-1]
    assert message in last, last
    assert not re.search(r"\w=|skt\.\w|parameter of", last), last


def test_layers_points_to_backbones(capsys):
    status, _, err = run(capsys, "layers", "vgg")
    assert status == 1
    assert err.endswith(" 'skt backbones' lists the valid names.\n")


@pytest.mark.parametrize(
    ("argv", "usage", "message"),
    [
        (["extract"], "usage: skt extract ",
         "skt extract: error: the following arguments are required: INPUT, -o/--output"),
        (["--bogus", "backbones"], "usage: skt ", "skt: error: unrecognized arguments: --bogus"),
        (["cache", "list", "/tmp"], "usage: skt cache ",
         "skt cache: error: argument action: invalid choice: 'list'"),
        ([], "usage: skt ", "skt: error: the following arguments are required: COMMAND"),
        (["extract", "a.png", "-o", "a.npy", "--batch-size", "0"], "usage: skt extract ",
         "skt extract: error: argument --batch-size: expected an integer >= 1, got '0'"),
        (["extract", "a.png", "-o", "a.npy", "--num-workers", "two"], "usage: skt extract ",
         "skt extract: error: argument --num-workers: expected an integer >= 0, got 'two'"),
        (["extract", "a.png", "-o", "a.npy", "--on-error", "ignore"], "usage: skt extract ",
         "skt extract: error: argument --on-error: invalid choice: 'ignore'"),
        (["compare", "folder", "--test-size", "1"], "usage: skt compare ",
         "skt compare: error: argument --test-size: expected a number between 0 and 1, got '1'"),
    ],
)
def test_usage_errors_exit_2_with_argparse_usage(argv, usage, message, capsys):
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == ""
    lines = err.splitlines()
    assert lines[0].startswith(usage)
    assert lines[-1].startswith(message)


def test_help_and_version_exit_0(capsys):
    status, out, err = run(capsys, "--version")
    assert (status, out, err) == (0, f"skt {__version__}\n", "")
    status, out, _ = run(capsys, "--help")
    assert status == 0 and out.startswith("usage: skt [-h] [--version] COMMAND ...")
    assert all(command in out for command in ("extract", "backbones", "layers", "rank", "cache",
                                              "demo", "compare"))


def test_exit_statuses_of_the_process():
    runtime = subprocess.run([sys.executable, "-m", "skt", "extract", "a.png", "-o", "a.csv"],
                             capture_output=True, text=True)
    assert runtime.returncode == 1
    assert runtime.stderr == ("skt: error: -o 'a.csv': the output must end in .npy or .npz.\n")
    usage = subprocess.run([sys.executable, "-m", "skt", "layers"], capture_output=True,
                           text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: skt layers ")
    assert usage.stderr.endswith("skt layers: error: the following arguments are required: "
                                 "backbone\n")


# ---------------------------------------------------------------- imports --

@pytest.mark.parametrize(
    ("argv", "absent"),
    [
        (["--help"], ["torch", "torchvision", "sklearn", "numpy"]),
        (["--version"], ["torch", "torchvision", "sklearn", "numpy"]),
        (["cache", "info", "{tmp}"], ["torch", "torchvision", "sklearn"]),
    ],
)
def test_fast_commands_do_not_import_torch_or_sklearn(argv, absent, tmp_path):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code = ("import json, sys\n"
            "from skt.cli import main\n"
            f"status = main({argv!r})\n"
            "print(json.dumps([status, sorted(sys.modules)]), file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    status, loaded = json.loads(result.stderr.splitlines()[-1])
    assert status == 0
    assert [name for name in absent if name in loaded] == []


# ------------------------------------------------------------------ pipes --

# Block-buffered stdout, as users have it: with PYTHONUNBUFFERED (which this suite may
# run under) a write fails at once, and the failing flush at exit is never tried.
BUFFERED = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}


def test_backbones_into_a_closed_pipe_exits_141_quietly():
    """The reader is gone before skt writes: like ``skt backbones | true``."""
    read_end, write_end = os.pipe()
    # The child waits for stdin to close, so the pipe has no reader when it prints.
    process = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; sys.stdin.read(); from skt.cli import main; sys.exit(main(['backbones']))"],
        stdin=subprocess.PIPE, stdout=write_end, stderr=subprocess.PIPE, text=True,
        env=BUFFERED)
    os.close(write_end)
    os.close(read_end)
    _, err = process.communicate(input="")
    assert process.returncode == 141, err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception" not in err


def test_layers_into_a_pipe_closed_after_one_line_exits_141_quietly():
    """Like ``skt layers densenet121 | head -1``: the reader takes one line and leaves."""
    fcntl = pytest.importorskip("fcntl")
    if not hasattr(fcntl, "F_SETPIPE_SZ"):
        pytest.skip("needs Linux, to make the pipe small")
    read_end, write_end = os.pipe()
    # densenet121 has 30 kB of layer names and shapes, more than this pipe and our read can take
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    process = subprocess.Popen([sys.executable, "-m", "skt", "layers", "densenet121"],
                               stdout=write_end, stderr=subprocess.PIPE, text=True,
                               env=BUFFERED)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        first = reader.readline()
    _, err = process.communicate()
    assert first.split() == [b"layer", b"output", b"shape", b"for", b"one", b"224", b"x", b"224",
                             b"image"]
    assert process.returncode == 141, err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception" not in err


# --------------------------------------------------- backbones, layers, cache --

def _layer_table(out):
    """``skt layers`` output as its header and {name: shape text}, checking the alignment."""
    header, *lines = out.splitlines()
    column = header.index("output shape")
    assert all(line[column - 2:column] == "  " and line[column] != " " for line in lines)
    return header, {line[:column].rstrip(): line[column:] for line in lines}


def test_layers_and_backbones(capsys):
    from skt import list_backbones, list_layers

    status, out, _ = run(capsys, "layers", "resnet18")
    header, shapes = _layer_table(out)
    assert status == 0 and list(shapes) == list_layers("resnet18")
    assert header.endswith("output shape for one 224 x 224 image")
    # by hand: stride 32 to layer4 (224 / 32 = 7), then global pooling, flatten and fc
    assert shapes["conv1"] == "(64, 112, 112)" and shapes["maxpool"] == "(64, 56, 56)"
    assert shapes["layer3"] == "(256, 14, 14)" and shapes["layer4"] == "(512, 7, 7)"
    assert shapes["avgpool"] == "(512, 1, 1)" and shapes["flatten"] == "(512,)"
    assert shapes["fc"] == "(1000,)"
    status, out, _ = run(capsys, "backbones")
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert status == 0 and list(lines) == list_backbones()
    assert lines["efficientnet_lite0"].endswith(" weights on disk")


def test_layers_at_another_image_size(capsys):
    status, out, _ = run(capsys, "layers", "efficientnet_lite0", "--image-size", "96")
    header, shapes = _layer_table(out)
    assert status == 0 and header.endswith("output shape for one 96 x 96 image")
    assert shapes["conv_stem"] == "(32, 48, 48)" and shapes["blocks.15"] == "(320, 3, 3)"
    assert shapes["conv_head"] == "(1280, 3, 3)" and shapes["fc"] == "(1000,)"


def test_layers_that_do_not_fit_the_image_say_so(capsys):
    # the ViT asserts its input size: 32 px for 224 px patches of 16
    status, out, err = run(capsys, "layers", "vit_b_16", "--image-size", "32")
    assert status == 1 and out == ""
    assert err.startswith("skt: error: vit_b_16 cannot run on a 32 x 32 image (AssertionError: "
                          "Wrong image height! Expected 224 ")
    assert err.endswith("; pass an --image-size it accepts.\n")


def test_layer_shapes_of_a_vision_transformer_are_tokens():
    from torchvision.models import VisionTransformer

    from skt.backbones import layer_shapes, list_layers

    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                            hidden_dim=16, mlp_dim=32, num_classes=3)
    shapes = layer_shapes(vit, image_size=32)
    assert list(shapes) == list_layers(vit)
    # (32 / 8)^2 = 16 patches of 16 channels, then 17 tokens with the class token
    assert shapes["conv_proj"] == (16, 4, 4) and shapes["permute"] == (16, 16)
    assert shapes["cat"] == (17, 16)
    assert shapes["encoder.layers.encoder_layer_1"] == (17, 16) and shapes["encoder"] == (17, 16)
    assert shapes["heads"] == (3,)
    # parameters read by the graph have no batch dimension to leave out
    assert shapes["class_token"] == (1, 1, 16)
    assert shapes["encoder.encoder_pos_embedding"] == (1, 17, 16)
    # tuples (attention output and weights) and sizes are not tensors
    assert shapes["encoder.layers.encoder_layer_0.self_attention"] is None
    assert shapes["getattr"] is None


def test_layer_shapes_of_a_module_fx_cannot_trace():
    """Control flow on values: forward hooks, on the CPU; a module that never runs gets None."""
    from torch import nn

    from skt.backbones import layer_shapes

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.unused = nn.Linear(4, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.conv(x)
            if x.mean() > 1e9:
                x = self.unused(x)
            return self.fc(x.mean((2, 3)))

    assert layer_shapes(Branchy(), image_size=16) == {"conv": (4, 14, 14), "unused": None,
                                                      "fc": (2,)}


def test_cache_info_and_clear(images, tmp_path, capsys):
    from skt import FeatureExtractor

    FeatureExtractor("resnet18", weights=None, image_size=32, random_state=0, engine="onnx",
                     cache=tmp_path).fit(images).transform(images)
    status, out, _ = run(capsys, "cache", "info", str(tmp_path))
    heading, config = out.splitlines()
    assert status == 0 and heading.startswith(f"{tmp_path}: 8 entries, 1 exported graphs, ")
    assert config.split()[1:5] == ["resnet18", "None", "32", "px"]
    size = heading.rsplit(", ", 1)[1]
    status, out, _ = run(capsys, "cache", "clear", str(tmp_path))
    assert status == 0 and out == f"freed {size} in {tmp_path}\n"
    assert run(capsys, "cache", "info", str(tmp_path))[1] == f"{tmp_path}: 0 entries, 0 B\n"



def test_a_quoted_tilde_in_inputs_and_output_means_the_home_folder(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "scans").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(home / "scans" / f"{i}.png")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert main(["extract", "~/scans/*.png", "-o", "~/out/f.npy", *TINY_ARGS]) == 0
    assert np.load(home / "out" / "f.npy").shape[0] == 2
    assert read_jsonl(home / "out" / "f.paths.jsonl") == [str(home / "scans" / f"{i}.png")
                                                          for i in range(2)]
    assert not (tmp_path / "~").exists()


def test_a_done_file_rewritten_at_its_size_and_time_counts_as_changed(tmp_path):
    from skt._utils import stat_digest

    path = tmp_path / "cell.bmp"
    path.write_bytes(b"\x00" * 64)
    stat = os.stat(path)
    before = stat_digest([str(path)]).hexdigest()
    path.write_bytes(b"\xff" * 64)  # other pixels, same size (as BMP files keep)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old time (cp -p)
    assert stat_digest([str(path)]).hexdigest() != before


# ---------------------------------------------------------------- compare --

COMPARE_ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32"]


def _class_folder(root, counts):
    """root/<class>/<i>.png, 24 x 24 px; each class a band of brightness of its own."""
    rng = np.random.default_rng(0)
    for number, (label, count) in enumerate(counts.items()):
        (root / label).mkdir(parents=True)
        low = 80 * number
        for i in range(count):
            pixels = rng.integers(low, low + 60, size=(24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def _table_rows(out):
    """The row names of the table ``skt compare`` prints, in order."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("row ")) + 2
    stop = lines.index("", start)
    return [re.split(r"\s{2,}", line)[0] for line in lines[start:stop]], lines[start:stop]


def test_compare_prints_the_demo_table_and_writes_its_files(tmp_path, capsys):
    folder = _class_folder(tmp_path / "cells", {"bright": 12, "dark": 12})
    output = tmp_path / "results"
    status, out, err = run(capsys, "compare", str(folder), *COMPARE_ARGS, "--quick",
                           "--output", str(output))
    assert status == 0, err
    assert "cells: 24 images in 2 classes, stratified 75/25 split (quick settings)" in out
    names, lines = _table_rows(out)
    assert names == [
        "Majority class",
        "Raw pixels + LogisticRegression",
        "Raw pixels + LinearSVC",
        "Raw pixels + PCA + LinearDiscriminantAnalysis",
        "resnet18 features + LogisticRegression",
        "resnet18 features + SVC (RBF)",
        "resnet18 features + PCA + LinearDiscriminantAnalysis",
        "resnet18 fine-tuned (1 epoch, 32 px)",
    ]
    # the majority class is right on half of the 6 held-out images; the classes'
    # brightness bands do not overlap, so raw pixels + LogisticRegression gets them all
    assert lines[0].split()[2:6] == ["0.500", "0.500", "0.333", "0.500"]
    assert lines[1].split()[4:8] == ["1.000", "1.000", "1.000", "1.000"]
    assert {p.name for p in output.iterdir()} == {"results.json", "results.md", "results.png",
                                                  "cache"}
    results = json.loads((output / "results.json").read_text())
    assert [row["name"] for row in results["rows"]] == names
    assert results["protocol"]["n_train"] == [18] and results["protocol"]["n_test"] == [6]
    assert results["dataset"]["class_counts"] == {"bright": 12, "dark": 12}
    assert results["settings"]["quick"] and results["settings"]["finetune"]
    assert results["settings"]["weights"] is None and results["settings"]["cv"] == 3
    markdown = (output / "results.md").read_text()
    assert all(f"| {name} |" in markdown for name in names)
    assert (output / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_without_finetuning_on_three_classes(tmp_path, capsys):
    folder = _class_folder(tmp_path / "three", {"a": 8, "b": 8, "c": 8})
    output = tmp_path / "out"
    status, out, err = run(capsys, "compare", str(folder), *COMPARE_ARGS, "--no-finetune",
                           "--test-size", "0.25", "--random-state", "3", "--output", str(output))
    assert status == 0, err
    names, _ = _table_rows(out)
    assert len(names) == 7 and not any("fine-tuned" in name for name in names)
    results = json.loads((output / "results.json").read_text())
    assert results["settings"]["finetune"] is False and results["settings"]["cv"] == 5
    assert results["protocol"]["random_state"] == 3
    assert results["protocol"]["n_test"] == [6]  # two of each class
    # macro one-vs-rest ROC-AUC, defined for three classes
    assert all(0.0 <= row["metrics"]["roc_auc"] <= 1.0 for row in results["rows"])
    assert results["rows"][0]["metrics"]["roc_auc"] == 0.5


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (None, "'{folder}' does not exist; give a folder with one subfolder of images per "
               "class (FOLDER/<class>/<image>)."),
        ({"cats": 12}, "'{folder}' holds one class ('cats', 12 images); a comparison needs "
                       "two or more: put each class's images in a subfolder of their own"),
        ({"cats": 12, "dogs": 5}, "Class 'dogs' has 5 images, too few for a stratified 75/25 "
                                  "split with 5-fold grid searches on the training part, which "
                                  "need 8 or more per class: add images to '{folder}/dogs', "
                                  "or move that folder out of the comparison."),
    ],
)
def test_compare_says_what_is_wrong_with_the_folder(layout, message, tmp_path, capsys):
    folder = tmp_path / "pets"
    if layout is not None:
        _class_folder(folder, layout)
    output = tmp_path / "out"
    status, out, err = run(capsys, "compare", str(folder), *COMPARE_ARGS, "--output",
                           str(output))
    assert status == 1 and out == ""
    assert err.startswith(f"skt: error: {message.format(folder=folder)}")
    assert err.count("\n") == 1 and not output.exists()
