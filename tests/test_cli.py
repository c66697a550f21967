"""skt.cli: the commands, their exit statuses, start-up imports and closed pipes."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from skt import __version__
from skt.cli import CommandError, collect_inputs, main

TINY_ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32",
             "--engine", "torch"]


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
    assert (tmp_path / "features.paths.txt").read_text().splitlines() == [
        *image_files[:4], image_files[7]]
    assert not (tmp_path / "features.labels.txt").exists()  # plain files have no labels

    from skt import FeatureExtractor

    expected = FeatureExtractor("resnet18", weights=str(weights), image_size=32, engine="torch",
                                layers=["layer2", "layer3"], pooling="max"
                                ).fit(image_files).transform(image_files[:4])
    np.testing.assert_allclose(features[:4], expected, rtol=1e-5, atol=1e-6)


def test_extract_files_to_npz_keeps_their_order_without_labels(image_files, tmp_path, capsys):
    output = tmp_path / "features.npz"
    status, _, err = run(capsys, "extract", *image_files[:3], "-o", str(output), *TINY_ARGS)
    assert status == 0, err
    with np.load(output) as saved:
        assert saved["paths"].tolist() == image_files[:3]
        assert "labels" not in saved.files
    assert not list(tmp_path.glob(".*.partial"))  # the staging file was renamed


def test_collect_inputs_refuses_missing_paths_and_empty_folders(tmp_path):
    missing, pattern = str(tmp_path / "missing"), str(tmp_path / "*.jpg")
    with pytest.raises(CommandError, match=re.escape(f"{missing!r} does not exist.")):
        collect_inputs([missing])
    with pytest.raises(CommandError, match=re.escape(f"{pattern!r} matches no file.")):
        collect_inputs([pattern])
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(CommandError, match=re.escape(f"{str(tmp_path)!r} holds no image files.")):
        collect_inputs([str(tmp_path)])


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
    ],
)
def test_errors_are_one_line_without_traceback(argv, message, image_files, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    argv = [a.format(files=image_files[0], out=tmp_path / "o.npy", broken=broken) for a in argv]
    status, _, err = run(capsys, *argv)
    assert status == 1
    last = err.rstrip("\n").split("\n")[-1]  # after any progress bar
    assert last.startswith("skt: error: ") and message in last
    assert err.count("skt: error") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "usage", "message"),
    [
        (["extract"], "usage: skt extract ",
         "skt extract: error: the following arguments are required: INPUT, -o/--output"),
        (["--bogus", "backbones"], "usage: skt ", "skt: error: unrecognized arguments: --bogus"),
        (["cache", "list", "/tmp"], "usage: skt cache ",
         "skt cache: error: argument action: invalid choice: 'list'"),
        ([], "usage: skt ", "skt: error: the following arguments are required: COMMAND"),
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
    assert all(command in out for command in ("extract", "backbones", "layers", "cache"))


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
    # densenet121 has 18.5 kB of layer names, more than this pipe and our read can take
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    process = subprocess.Popen([sys.executable, "-m", "skt", "layers", "densenet121"],
                               stdout=write_end, stderr=subprocess.PIPE, text=True,
                               env=BUFFERED)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        first = reader.readline()
    _, err = process.communicate()
    assert first == b"features.conv0\n"
    assert process.returncode == 141, err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception" not in err


# --------------------------------------------------- backbones, layers, cache --

def test_layers_and_backbones(capsys):
    from skt import list_backbones, list_layers

    status, out, _ = run(capsys, "layers", "resnet18")
    assert status == 0 and out.splitlines() == list_layers("resnet18")
    status, out, _ = run(capsys, "backbones")
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert status == 0 and list(lines) == list_backbones()
    assert lines["efficientnet_lite0"].endswith(" weights on disk")


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

