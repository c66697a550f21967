import subprocess
import sys

import numpy as np
import pytest

from skt.cli import collect_inputs, main

TINY_ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32",
             "--engine", "torch"]


def run(capsys, *argv):
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_extract_class_folder_to_npz(image_folder, tmp_path, capsys):
    output = tmp_path / "out" / "features.npz"
    status, _, err = run(capsys, "extract", str(image_folder), "-o", str(output), *TINY_ARGS)
    assert status == 0, err
    with np.load(output) as saved:
        assert saved["features"].shape == (12, 512) and saved["features"].dtype == np.float32
        assert saved["labels"].tolist() == ["bright"] * 6 + ["dark"] * 6
        assert saved["paths"][0].endswith("0.png")
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
    assert (tmp_path / "features.paths.txt").read_text().splitlines()[-1] == image_files[7]
    assert not (tmp_path / "features.labels.txt").exists()  # plain files have no labels

    from skt import FeatureExtractor

    expected = FeatureExtractor("resnet18", weights=str(weights), image_size=32, engine="torch",
                                layers=["layer2", "layer3"], pooling="max"
                                ).fit(image_files).transform(image_files[:4])
    np.testing.assert_allclose(features[:4], expected, rtol=1e-5, atol=1e-6)


def test_collect_inputs_refuses_missing_paths(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        collect_inputs([str(tmp_path / "missing")])
    with pytest.raises(Exception, match="matches no file"):
        collect_inputs([str(tmp_path / "*.jpg")])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["extract", "/no/such/file.png", "-o", "x.npy"], "'/no/such/file.png' does not exist"),
        (["extract", "{files}", "-o", "x.csv"], "must end in .npy or .npz"),
        (["extract", "{files}", "-o", "{out}", "--backbone", "resnet_18"],
         "Unknown backbone 'resnet_18'. Close matches: ['resnet18', "),
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


def test_layers_and_backbones(capsys):
    status, out, _ = run(capsys, "layers", "resnet18")
    assert status == 0 and "layer4" in out.splitlines()
    status, out, _ = run(capsys, "backbones")
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "weights on disk" in lines["efficientnet_lite0"]
    assert "resnet18" in lines


def test_cache_info_and_clear(images, tmp_path, capsys):
    from skt import FeatureExtractor

    FeatureExtractor("resnet18", weights=None, image_size=32, random_state=0, engine="onnx",
                     cache=tmp_path).fit(images).transform(images)
    status, out, _ = run(capsys, "cache", "info", str(tmp_path))
    assert status == 0 and "8 entries, 1 exported graphs" in out and "resnet18" in out
    status, out, _ = run(capsys, "cache", "clear", str(tmp_path))
    assert status == 0 and out.startswith("freed ")
    assert "0 entries" in run(capsys, "cache", "info", str(tmp_path))[1]


def test_python_dash_m_and_usage_errors():
    result = subprocess.run([sys.executable, "-m", "skt", "layers", "alexnet"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "features.0" in result.stdout.split()
    usage = subprocess.run([sys.executable, "-m", "skt", "extract"], capture_output=True,
                           text=True)
    assert usage.returncode == 2 and "required" in usage.stderr
