"""The ONNX Runtime engine against the eager torch engine."""

import numpy as np
import pytest

import skt.extract
from skt import FeatureExtractor

from .conftest import TINY

pytest.importorskip("onnxruntime")
ONNX = {**TINY, "engine": "onnx"}


@pytest.fixture(scope="module")
def pictures():
    return np.random.default_rng(1).integers(0, 256, size=(6, 40, 40, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "params",
    [
        {"pooling": "avg", "layers": "layer3"},
        {"pooling": "max", "layers": "layer3"},
        {"pooling": "gem", "layers": "layer3"},
        {"pooling": "avgmax", "layers": "layer3"},
        {"pooling": "flatten", "layers": "layer3"},
        {"layers": ["layer1", "layer4"], "pooling": "avgmax"},
        {},
    ],
)
def test_onnx_matches_torch(pictures, params):
    onnx = FeatureExtractor(**{**ONNX, **params}).fit(pictures)
    torch_ = FeatureExtractor(**{**TINY, **params}).fit(pictures)
    assert (onnx.engine_, torch_.engine_) == ("onnx", "torch")
    np.testing.assert_allclose(onnx.transform(pictures), torch_.transform(pictures),
                               rtol=1e-3, atol=1e-4)


@pytest.mark.pretrained
def test_onnx_matches_torch_on_real_lite0(pictures):
    onnx = FeatureExtractor(engine="onnx", layers=["blocks.10", "head_act"]).fit(pictures)
    torch_ = FeatureExtractor(engine="torch", layers=["blocks.10", "head_act"]).fit(pictures)
    np.testing.assert_allclose(onnx.transform(pictures), torch_.transform(pictures),
                               rtol=1e-3, atol=1e-4)


def test_auto_prefers_onnx_on_the_cpu(pictures, capsys):
    extractor = FeatureExtractor(**{**TINY, "engine": "auto"}, verbose=1).fit(pictures)
    assert extractor.engine_ == "onnx"
    assert "with the onnx engine on cpu" in capsys.readouterr().err


def test_export_failure_falls_back_to_torch_with_the_reason(pictures, monkeypatch):
    def broken(model, size):
        raise RuntimeError("unsupported operator aten::weird")

    monkeypatch.setattr(skt.extract, "_export_onnx", broken)
    with pytest.warns(RuntimeWarning, match=r"ONNX export failed \(unsupported operator "
                                            r"aten::weird\); using the torch engine"):
        extractor = FeatureExtractor(**{**TINY, "engine": "auto", "layers": "layer1"}
                                     ).fit(pictures)
    assert extractor.engine_ == "torch"


def test_explicit_onnx_without_onnxruntime(pictures, monkeypatch):
    monkeypatch.setattr(skt.extract, "onnx_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install 'skt\[onnx\]'"):
        FeatureExtractor(**{**ONNX, "layers": "layer2"}).fit(pictures)
    assert FeatureExtractor(**{**TINY, "engine": "auto", "layers": "layer2"}
                            ).fit(pictures).engine_ == "torch"


def test_exported_graph_is_kept_in_the_cache(pictures, tmp_path, monkeypatch):
    first = FeatureExtractor(**{**ONNX, "layers": "layer2", "cache": tmp_path}).fit(pictures)
    graphs = list((tmp_path / "skt-features").rglob("graph-*.onnx"))
    assert len(graphs) == 1 and graphs[0].stat().st_size > 100_000
    skt.extractor._RUNTIMES.items.clear()  # as in a new process

    def no_export(model, size):
        raise AssertionError("exported again")

    monkeypatch.setattr(skt.extract, "_export_onnx", no_export)
    second = FeatureExtractor(**{**ONNX, "layers": "layer2", "cache": tmp_path}).fit(pictures)
    assert second.engine_ == "onnx"
    np.testing.assert_array_equal(first.transform(pictures), second.transform(pictures))


def test_without_a_cache_graphs_go_to_skt_cache_dir(pictures, tmp_path, monkeypatch):
    monkeypatch.setenv("SKT_CACHE_DIR", str(tmp_path))
    first = FeatureExtractor(**{**ONNX, "layers": "layer1"}).fit(pictures)
    assert len(list(tmp_path.rglob("graph-*.onnx"))) == 1
    skt.extractor._RUNTIMES.items.clear()

    def no_export(model, size):
        raise AssertionError("exported again")

    monkeypatch.setattr(skt.extract, "_export_onnx", no_export)
    second = FeatureExtractor(**{**ONNX, "layers": "layer1"}).fit(pictures)
    np.testing.assert_array_equal(first.transform(pictures), second.transform(pictures))
