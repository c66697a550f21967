"""skt.extract: truncation, the feature model, engines, device choice, the shared path."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from torch import nn

import skt.cache
import skt.extract._device
import skt.extract._engines
import skt.extractor
from skt import FeatureExtractor, cache_info
from skt.backbones import PRE_LOGITS, resolve_backbone
from skt.cache import FeatureCache
from skt.extract import (
    FeatureModel,
    FeatureRuntime,
    build_feature_model,
    extract_into,
    resolve_device,
    truncate,
)
from skt.images import as_image_list, preprocess

from .conftest import TINY, require

ONNX = {**TINY, "engine": "onnx"}


@pytest.fixture(autouse=True)
def _onnx(request):
    if "onnx" in request.node.name or "graph" in request.node.name:
        require("onnxruntime", "pip install 'skt[onnx]'")


# ------------------------------------------------------------- truncation --

def test_truncate_at_pre_logits_gives_the_classifier_input():
    backbone = resolve_backbone("resnet18", weights=None, random_state=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        pooled = backbone.model.avgpool(nn.Sequential(*list(backbone.model.children())[:-2])(x))
        cut = truncate(backbone.model, [PRE_LOGITS], backbone.classifier)(x)
    assert list(cut) == [PRE_LOGITS]
    torch.testing.assert_close(cut[PRE_LOGITS], pooled.flatten(1))


def test_truncate_returns_named_layers_and_the_classifier_output():
    backbone = resolve_backbone("resnet18", weights=None, random_state=0)
    model = backbone.model
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        logits = model(x)
        layer1 = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))
        out = truncate(model, ["layer1", "fc"], backbone.classifier)(x)
    torch.testing.assert_close(out["layer1"], layer1)
    torch.testing.assert_close(out["fc"], logits)


def test_feature_model_layout_and_summaries():
    backbone = resolve_backbone("resnet18", weights=None, random_state=0)
    model, layout = build_feature_model(backbone.model, backbone.classifier, 32,
                                        ["layer3"], "avg")
    assert isinstance(model, FeatureModel)
    assert [(layer.name, layer.kind, layer.width) for layer in layout] == [
        ("layer3", "stats", 3 * 256)]
    with torch.inference_mode():
        (summary,) = model(torch.randn(3, 3, 32, 32))
    assert summary.shape == (3, 768) and summary.dtype == torch.float32
    _, flat = build_feature_model(
        resolve_backbone("resnet18", weights=None).model, "fc", 32, ["layer3"], "flatten")
    assert flat[0].kind == "flat" and flat[0].width == 256 * 2 * 2


def test_a_layer_that_is_not_one_tensor_is_refused():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: FX cannot trace it, so layers come from hooks
                x = x * 2
            return self.fc(self.pair(x)[0].mean((2, 3)))

    with pytest.raises(TypeError, match="Layer 'pair' returns a tuple, not a tensor"):
        build_feature_model(Net(), "fc", 16, ["pair"], "avg")


# ---------------------------------------------------------------- device --

def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device='gpu' is not a torch device; use 'auto'"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match=r"device='cuda:1' is not available on this machine"):
        resolve_device("cuda:1")
    with pytest.warns(RuntimeWarning, match="is not available on this machine; using the CPU"):
        assert resolve_device("cuda", fallback=True) == torch.device("cpu")


# ------------------------------------------------------------ shared path --

def test_extract_into_with_and_without_a_cache(images, tmp_path):
    backbone = resolve_backbone("resnet18", weights=None, image_size=32, random_state=0)
    runtime = FeatureRuntime(backbone.model, backbone.classifier, backbone.preprocessing,
                             ["layer2", "layer4"], "avgmax", device=torch.device("cpu"))
    assert [layer.width for layer in runtime.layout] == [3 * 128, 3 * 512]
    items = as_image_list(images)
    plain = extract_into(np.zeros((8, 2 * (128 + 512)), np.float32), items, runtime, "avgmax",
                         batch_size=3, num_workers=0)
    layer2, layer4 = (np.concatenate(parts) for parts in zip(
        *(summaries for _, summaries in runtime.summaries(items, range(8), 8, 0)), strict=True))
    by_hand = np.concatenate([layer2[:, :128], layer2[:, 128:256],  # avg, max per channel
                              layer4[:, :512], layer4[:, 512:1024]], axis=1)
    np.testing.assert_allclose(plain, by_hand, rtol=1e-6, atol=1e-6)
    cached = extract_into(np.zeros_like(plain), items, runtime, "avgmax", batch_size=3,
                          num_workers=0, cache=FeatureCache(tmp_path),
                          description={"net": "resnet18"})
    np.testing.assert_allclose(cached, plain, rtol=1e-5, atol=1e-6)
    assert cache_info(tmp_path)["entries"] == 2 * 8


# ---------------------------------------------------------------- engines --

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


AUTO = {**TINY, "engine": "auto", "layers": "layer2"}


def _measured(monkeypatch, rates):
    """Replace the timing of engines with ``rates``; returns the list of calls."""
    skt.extractor._RUNTIMES.clear()  # no engine chosen by an earlier test
    calls = []

    def measure(engines, size, **kwargs):
        calls.append(sorted(engines))
        return {name: rates[name] for name in engines}

    monkeypatch.setattr(skt.extract._engines, "measure_engines", measure)
    return calls


def test_auto_measures_onnx_against_torch_and_remembers_the_choice(pictures, tmp_path,
                                                                    monkeypatch, capsys):
    calls = _measured(monkeypatch, {"onnx": 300.0, "torch": 100.0})
    first = FeatureExtractor(**AUTO, cache=tmp_path, verbose=1).fit(pictures)
    assert first.engine_ == "onnx" and calls == [["onnx", "torch"]]
    assert ("with the onnx engine on cpu (measured on this machine: onnx 300 img/s, torch "
            "100 img/s)") in capsys.readouterr().err
    (choice,) = tmp_path.rglob("graph-*-engine-*.json")
    assert json.loads(skt.cache.unseal(choice, choice.read_bytes())) == {
        "engine": "onnx", "rates": {"onnx": 300.0, "torch": 100.0}, "batch": 16}
    skt.extractor._RUNTIMES.clear()  # a new process on the same machine: no measuring
    calls = _measured(monkeypatch, {"onnx": 1.0, "torch": 1000.0})
    second = FeatureExtractor(**AUTO, cache=tmp_path).fit(pictures)
    assert second.engine_ == "onnx" and calls == []
    assert second._get_runtime().engine.rates == {"onnx": 300.0, "torch": 100.0}
    np.testing.assert_array_equal(second.transform(pictures), first.transform(pictures))
    # Another machine (CPU, threads or versions): measured again, its own file.
    skt.extractor._RUNTIMES.clear()
    monkeypatch.setattr(skt.extract._engines, "machine_key", lambda threads: "othermachine")
    third = FeatureExtractor(**AUTO, cache=tmp_path).fit(pictures)
    assert third.engine_ == "torch" and calls == [["onnx", "torch"]]
    assert len(list(tmp_path.rglob("graph-*-engine-*.json"))) == 2
    # Another configuration: measured again.
    FeatureExtractor(**{**AUTO, "layers": "layer3"}, cache=tmp_path).fit(pictures)
    assert len(calls) == 2


def test_auto_remembers_torch_and_skips_the_export(pictures, tmp_path, monkeypatch):
    _measured(monkeypatch, {"onnx": 100.0, "torch": 300.0})
    first = FeatureExtractor(**AUTO, cache=tmp_path).fit(pictures)
    assert first.engine_ == "torch"
    exact = FeatureExtractor(**{**AUTO, "engine": "torch"}).fit(pictures).transform(pictures)
    np.testing.assert_array_equal(first.transform(pictures), exact)
    skt.extractor._RUNTIMES.clear()

    def no_export(model, size):
        raise AssertionError("exported again")

    monkeypatch.setattr(skt.extract._engines, "_export_onnx", no_export)
    assert FeatureExtractor(**AUTO, cache=tmp_path).fit(pictures).engine_ == "torch"


def test_auto_keeps_the_engine_it_measured_faster(pictures, tmp_path):
    skt.extractor._RUNTIMES.clear()
    extractor = FeatureExtractor(**AUTO, cache=tmp_path).fit(pictures)
    rates = extractor._get_runtime().engine.rates
    assert set(rates) == {"onnx", "torch"} and min(rates.values()) > 0
    assert extractor.engine_ == max(rates, key=rates.get)
    # A damaged choice is measured again, not trusted.
    (choice,) = tmp_path.rglob("graph-*-engine-*.json")
    choice.write_bytes(choice.read_bytes()[:-3])
    skt.extractor._RUNTIMES.clear()
    again = FeatureExtractor(**AUTO, cache=tmp_path).fit(pictures)
    assert again._get_runtime().engine.rates is not rates
    assert skt.cache.unseal(choice, choice.read_bytes()) is not None  # sound again


def test_export_failure_falls_back_to_torch_with_the_reason(pictures, monkeypatch):
    def broken(model, size):
        raise RuntimeError("unsupported operator aten::weird")

    monkeypatch.setattr(skt.extract._engines, "_export_onnx", broken)
    with pytest.warns(RuntimeWarning, match=r"ONNX export failed \(unsupported operator "
                                            r"aten::weird\); using the torch engine"):
        extractor = FeatureExtractor(**{**TINY, "engine": "auto", "layers": "layer1"}
                                     ).fit(pictures)
    assert extractor.engine_ == "torch"


def test_explicit_onnx_without_onnxruntime(pictures, monkeypatch):
    monkeypatch.setattr(skt.extract._engines, "onnx_available", lambda: False)
    skt.extractor._RUNTIMES.clear()  # engines built while ONNX Runtime was there
    with pytest.raises(ImportError, match=r"pip install 'skt\[onnx\]'"):
        FeatureExtractor(**{**ONNX, "layers": "layer2"}).fit(pictures)
    assert FeatureExtractor(**{**TINY, "engine": "auto", "layers": "layer2"}
                            ).fit(pictures).engine_ == "torch"


def test_exported_graph_is_kept_in_the_cache(pictures, tmp_path, monkeypatch):
    first = FeatureExtractor(**{**ONNX, "layers": "layer2", "cache": tmp_path}).fit(pictures)
    graphs = list((tmp_path / "skt-features").rglob("graph-*.onnx"))
    assert len(graphs) == 1 and graphs[0].stat().st_size > 100_000
    skt.extractor._RUNTIMES.clear()  # as in a new process

    def no_export(model, size):
        raise AssertionError("exported again")

    monkeypatch.setattr(skt.extract._engines, "_export_onnx", no_export)
    second = FeatureExtractor(**{**ONNX, "layers": "layer2", "cache": tmp_path}).fit(pictures)
    assert second.engine_ == "onnx"
    np.testing.assert_array_equal(first.transform(pictures), second.transform(pictures))


def test_without_a_cache_graphs_go_to_skt_cache_dir(pictures, tmp_path, monkeypatch):
    monkeypatch.setenv("SKT_CACHE_DIR", str(tmp_path))
    first = FeatureExtractor(**{**ONNX, "layers": "layer1"}).fit(pictures)
    assert len(list(tmp_path.rglob("graph-*.onnx"))) == 1
    skt.extractor._RUNTIMES.clear()

    def no_export(model, size):
        raise AssertionError("exported again")

    monkeypatch.setattr(skt.extract._engines, "_export_onnx", no_export)
    second = FeatureExtractor(**{**ONNX, "layers": "layer1"}).fit(pictures)
    np.testing.assert_array_equal(first.transform(pictures), second.transform(pictures))


def test_skt_cache_dir_keeps_the_most_recently_used_graphs_within_its_bound(
        pictures, tmp_path, monkeypatch):
    monkeypatch.setenv("SKT_CACHE_DIR", str(tmp_path))
    skt.extractor._RUNTIMES.clear()
    FeatureExtractor(**{**ONNX, "layers": "layer1"}).fit(pictures)
    (used,) = tmp_path.rglob("graph-*.onnx")
    stale = used.parent.parent / "other" / "graph-stale.onnx"
    stale.parent.mkdir()
    stale.write_bytes(b"x" * 1000)
    os.utime(used, (1_000_000, 1_000_000))  # both old; the next fit uses the first again
    os.utime(stale, (2_000_000, 2_000_000))
    skt.extractor._RUNTIMES.clear()
    bound = used.stat().st_size + 500  # room for one of them
    monkeypatch.setenv("SKT_CACHE_MAX_BYTES", str(bound))
    FeatureExtractor(**{**ONNX, "layers": "layer1"}).fit(pictures)
    assert used.is_file() and not stale.exists()  # loading it made it the recent one
    monkeypatch.setenv("SKT_CACHE_MAX_BYTES", "none")
    skt.extractor._RUNTIMES.clear()
    FeatureExtractor(**{**ONNX, "layers": "layer2"}).fit(pictures)
    assert len(list(tmp_path.rglob("graph-*.onnx"))) == 2  # no bound


def test_a_feature_cache_folder_is_never_pruned(pictures, tmp_path, monkeypatch):
    monkeypatch.setenv("SKT_CACHE_MAX_BYTES", "0")
    skt.extractor._RUNTIMES.clear()
    FeatureExtractor(**{**ONNX, "layers": "layer1", "cache": tmp_path}).fit(pictures)
    assert len(list(tmp_path.rglob("graph-*.onnx"))) == 1


def test_a_bad_cache_bound_is_an_error(monkeypatch):
    monkeypatch.setenv("SKT_CACHE_MAX_BYTES", "1GB")
    with pytest.raises(ValueError, match="SKT_CACHE_MAX_BYTES='1GB': give a number of bytes"):
        skt.cache.default_cache_max_bytes()


# ------------------------------------------------------- items that fail --

@pytest.fixture(scope="module")
def runtime():
    backbone = resolve_backbone("resnet18", weights=None, image_size=32, random_state=0)
    return FeatureRuntime(backbone.model, backbone.classifier, backbone.preprocessing,
                          ["layer4"], "avg", device=torch.device("cpu"))


def _extract(items, runtime, **kwargs):
    out = np.zeros((len(items), 512), np.float32)
    return extract_into(out, items, runtime, "avg", batch_size=2, num_workers=0, **kwargs)


def test_summaries_leave_out_the_rows_of_failed_items(images, runtime):
    failures = {}
    items = as_image_list([images[0], "gone.png", np.full((4, 4), np.nan), images[1],
                           images[2]], failures=failures)
    assert sorted(failures) == [1, 2]
    rows = [rows for rows, _ in runtime.summaries(items, range(5), 2, 0, failures=failures)]
    assert rows == [[0], [3], [4]]
    first = [rows for rows, _ in runtime.summaries(items, [1, 2, 3], 2, 0, failures=failures)]
    assert first == [[3]]  # a batch whose items all failed yields nothing


def test_extract_into_fills_nan_rows_and_caches_only_what_was_read(images, image_files,
                                                                  runtime, tmp_path):
    closed = Image.open(image_files[0])
    closed.close()  # cannot even be hashed for the cache
    failures = {}
    items = as_image_list([images[0], closed, "gone.png", images[1]], failures=failures)
    cache = FeatureCache(tmp_path)
    out = _extract(items, runtime, cache=cache, description={"net": "r18"}, failures=failures)
    assert sorted(failures) == [1, 2]
    assert failures[1].startswith("Image 1 (a PIL image opened from")
    assert np.isnan(out[[1, 2]]).all() and not np.isnan(out[[0, 3]]).any()
    np.testing.assert_allclose(out[[0, 3]], _extract(as_image_list(images[:2]), runtime),
                               rtol=1e-5, atol=1e-6)
    assert cache_info(tmp_path)["entries"] == 2
    with pytest.raises(ValueError, match=r"^Image 1 \(a PIL image opened from .*\) cannot be "
                                         r"read as an image \(Operation on closed image\)"):
        _extract(as_image_list([images[0], closed]), runtime, cache=cache,
                 description={"net": "r18"})


def test_pil_twins_that_differ_in_orientation_do_not_share_a_cache_entry(images, runtime,
                                                                        tmp_path):
    tagged, plain = Image.fromarray(images[0]), Image.fromarray(images[0])
    tagged.getexif()[ExifTags.Base.Orientation] = 6
    items = as_image_list([tagged, plain])
    expected = _extract(items, runtime)
    assert not np.allclose(expected[0], expected[1], rtol=1e-3, atol=1e-3)
    for _ in range(2):  # fills the cache, then reads it
        cached = _extract(items, runtime, cache=FeatureCache(tmp_path),
                          description={"net": "r18"})
        np.testing.assert_allclose(cached, expected, rtol=1e-5, atol=1e-6)
    assert cache_info(tmp_path)["entries"] == 2


# ---------------------------------------------- transformer and channels-last layers --

def _tiny_vit():
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                             hidden_dim=16, mlp_dim=32, num_classes=5)


def _raw_output(module, layer, x):
    seen = {}
    handle = module.get_submodule(layer).register_forward_hook(
        lambda mod, args, out: seen.setdefault("out", out))
    with torch.inference_mode():
        module.eval()(x)
    handle.remove()
    return seen["out"]


def _fitted(backbone, images, **params):
    return FeatureExtractor(backbone, weights=None, image_size=32, engine="torch",
                            **params).fit(images)


@pytest.mark.parametrize(("pooling", "width"), [("cls", 16), ("avg", 16), ("gem", 16),
                                                ("clsavg", 32), ("avgmax", 32)])
def test_vit_block_poolings_equal_a_hand_computation(images, pooling, width):
    vit = _tiny_vit()
    layer = "encoder.layers.encoder_layer_1"
    extractor = _fitted(vit, images, layers=layer, pooling=pooling)
    assert extractor._layout[0].kind == "tokens"
    x = torch.stack([preprocess(torch.from_numpy(a).permute(2, 0, 1),
                                extractor.preprocessing_) for a in images])
    tokens = _raw_output(vit, layer, x)  # (8, 1 + 16, 16): the class token, 4x4 patches
    assert tokens.shape == (8, 17, 16)
    cls, patches = tokens[:, 0], tokens[:, 1:]
    gem = (patches.clamp(min=1e-6) ** 3).mean(1) ** (1 / 3)
    expected = {"cls": cls, "avg": patches.mean(1), "gem": gem,
                "clsavg": torch.cat([cls, patches.mean(1)], 1),
                "avgmax": torch.cat([patches.mean(1), patches.amax(1)], 1)}[pooling]
    features = extractor.transform(images)
    assert features.shape == (8, width)
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert extractor.get_feature_names_out()[0] == f"{layer}_{pooling[:3]}_0"


def test_vit_default_layer_is_the_class_token_its_head_reads(images):
    vit = _tiny_vit()
    extractor = _fitted(vit, images)
    x = torch.stack([preprocess(torch.from_numpy(a).permute(2, 0, 1),
                                extractor.preprocessing_) for a in images])
    head_input = _raw_output(vit, "encoder", x)[:, 0]  # encoder.ln output, class token
    np.testing.assert_allclose(extractor.transform(images), head_input.numpy(), rtol=1e-4,
                               atol=1e-5)


def test_patch_embedding_before_the_class_token_has_none(images):
    with pytest.raises(ValueError, match=r"pooling='cls' takes the class token, and layer "
                                         r"'conv_proj' \(\(16, 4, 4\) per image\) has none"):
        _fitted(_tiny_vit(), images, layers="conv_proj", pooling="cls")
    with pytest.raises(ValueError, match="layer 'layer3' .* has none"):
        _fitted("resnet18", images, layers="layer3", pooling="cls")


def test_swin_channels_last_stage_pools_over_height_and_width(images):
    from torchvision.models import SwinTransformer
    torch.manual_seed(0)
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=12, depths=[1, 1], num_heads=[1, 1],
                           window_size=[2, 2], num_classes=3)
    extractor = _fitted(swin, images, layers="features.1", pooling="avgmax")
    x = torch.stack([preprocess(torch.from_numpy(a).permute(2, 0, 1),
                                extractor.preprocessing_) for a in images])
    maps = _raw_output(swin, "features.1", x)
    assert maps.shape == (8, 8, 8, 12)  # (N, H, W, C)
    expected = torch.cat([maps.mean((1, 2)), maps.amax((1, 2))], 1)
    np.testing.assert_allclose(extractor.transform(images), expected.numpy(), rtol=1e-4,
                               atol=1e-5)
    assert extractor.n_features_out_ == 24


class _Windows(nn.Module):
    """Cuts maps into 4x4 windows stacked along the first axis, as window attention does."""

    def forward(self, x):
        n, c, h, w = x.shape
        return x.reshape(n, c, h // 4, 4, w // 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, 4, 4)


def test_a_layer_that_mixes_images_with_windows_is_refused(images):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _Windows(), nn.Flatten(),
                          nn.Linear(64, 2))
    with pytest.raises(ValueError, match=r"Layer '1' gives \(128, 4, 4, 4\) for 2 images: its "
                                         "first axis is not the images"):
        _fitted(model, images, layers="1")


def test_timm_vit_registers_stay_out_of_the_patch_mean(images):
    timm = pytest.importorskip("timm", reason="the timm extra: pip install 'skt[timm]'")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                            embed_dim=16, num_heads=2, reg_tokens=4, num_classes=3)
    extractor = _fitted(vit, images, layers="blocks.1", pooling="clsavg")
    x = torch.stack([preprocess(torch.from_numpy(a).permute(2, 0, 1),
                                extractor.preprocessing_) for a in images])
    tokens = _raw_output(vit, "blocks.1", x)
    assert tokens.shape == (8, 1 + 4 + 16, 16)
    expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], 1)
    np.testing.assert_allclose(extractor.transform(images), expected.numpy(), rtol=1e-4,
                               atol=1e-5)


def test_a_stored_graph_that_computes_the_layers_is_reused(pictures, tmp_path, monkeypatch):
    both = FeatureExtractor(**{**ONNX, "layers": ["layer1", "layer3"], "cache": tmp_path}
                            ).fit(pictures)
    expected = both.transform(pictures)  # 64 layer1 columns, then 256 of layer3
    (note,) = tmp_path.rglob("graph-*.layers.json")
    assert json.loads(skt.cache.unseal(note, note.read_bytes()))["layout"] == [
        ["layer1", "stats", 192], ["layer3", "stats", 768]]  # the summaries of every pooling
    assert skt.cache_info(tmp_path)["graphs"] == 1
    skt.extractor._RUNTIMES.clear()  # a later process

    def no_export(model, size):
        raise AssertionError("exported again")

    monkeypatch.setattr(skt.extract._engines, "_export_onnx", no_export)
    deepest = FeatureExtractor(**{**ONNX, "layers": "layer3", "cache": tmp_path}).fit(pictures)
    assert deepest.engine_ == "onnx"
    np.testing.assert_allclose(deepest.transform(pictures), expected[:, 64:], rtol=1e-6)
    swapped = FeatureExtractor(**{**ONNX, "layers": ["layer3", "layer1"], "cache": tmp_path}
                               ).fit(pictures)
    np.testing.assert_allclose(swapped.transform(pictures),
                               np.hstack([expected[:, 64:], expected[:, :64]]), rtol=1e-6)
    # layer1 alone runs a quarter of the network: the deeper graph is not worth reusing.
    with pytest.warns(RuntimeWarning, match=r"ONNX export failed \(exported again\)"):
        FeatureExtractor(**{**ONNX, "layers": "layer1", "cache": tmp_path}).fit(pictures)
    # Another pooling's summaries are not in the graph.
    with pytest.warns(RuntimeWarning, match=r"ONNX export failed \(exported again\)"):
        FeatureExtractor(**{**ONNX, "layers": "layer3", "pooling": "flatten",
                            "cache": tmp_path}).fit(pictures)
    # A damaged note is passed over in silence, and the graph exported anew.
    skt.extractor._RUNTIMES.clear()
    note.write_bytes(note.read_bytes()[:-2])
    monkeypatch.undo()
    FeatureExtractor(**{**ONNX, "layers": ["layer2", "layer3"], "cache": tmp_path}).fit(pictures)
    assert len(list(tmp_path.rglob("graph-*.onnx"))) == 2


def test_onnx_engine_pools_tokens_as_torch_does(images, tmp_path):
    vit = _tiny_vit()
    params = {"layers": ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"],
              "pooling": "clsavg", "cache": tmp_path}
    eager = _fitted(vit, images, **params)
    exported = FeatureExtractor(vit, weights=None, image_size=32, engine="onnx",
                                **params).fit(images)
    assert exported.engine_ == "onnx"
    np.testing.assert_allclose(exported.transform(images), eager.transform(images),
                               rtol=1e-4, atol=1e-4)


def _timm_swin():
    timm = pytest.importorskip("timm", reason="the timm extra: pip install 'skt[timm]'")
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=2,
                             embed_dim=12, depths=(1, 1), num_heads=(1, 1), num_classes=3)


def _torchvision_convnext():
    from torchvision.models import ConvNeXt
    from torchvision.models.convnext import CNBlockConfig
    torch.manual_seed(0)
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=3)


@pytest.mark.parametrize(("make", "layer", "axes", "shape"), [
    (_timm_swin, "layers.1", (1, 2), (8, 4, 4, 24)),  # timm's Swin stages are channels-last
    (_torchvision_convnext, "features.3", (2, 3), (8, 16, 4, 4)),
    (lambda: pytest.importorskip("timm") and "timm:convnext_atto", "stages.1", (2, 3),
     (8, 80, 4, 4)),
])
def test_stage_pooling_follows_the_channel_axis(images, make, layer, axes, shape):
    backbone = make()
    extractor = FeatureExtractor(backbone, weights=None, image_size=32, engine="torch",
                                 random_state=0, layers=layer, pooling="avgmax").fit(images)
    x = torch.stack([preprocess(torch.from_numpy(a).permute(2, 0, 1),
                                extractor.preprocessing_) for a in images])
    maps = _raw_output(extractor.model_, layer, x)
    assert tuple(maps.shape) == shape
    expected = torch.cat([maps.mean(axes), maps.amax(axes)], 1)
    np.testing.assert_allclose(extractor.transform(images), expected.numpy(), rtol=1e-4,
                               atol=1e-5)
    channels = expected.shape[1] // 2
    assert list(extractor.get_feature_names_out()[[0, channels]]) == [f"{layer}_avg_0",
                                                                      f"{layer}_max_0"]


# ---------------------------------------------------------------- threads --

class _ThreadRecorder(nn.Module):
    """A tiny network that notes how many torch threads each forward pass runs on."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)
        self.seen = []

    def forward(self, x):
        self.seen.append(torch.get_num_threads())
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize(("n_threads", "expected"), [(1, 1), (None, 2)])
def test_n_threads_sets_the_torch_engine_threads_and_restores_them(images, n_threads,
                                                                   expected):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        extractor = FeatureExtractor(_ThreadRecorder(), image_size=32, engine="torch",
                                     n_threads=n_threads, batch_size=4).fit(images)
        network = extractor._get_runtime().engine.model.body.model  # the runtime's own copy
        network.seen.clear()
        extractor.transform(images)
        assert network.seen == [expected, expected]  # two batches of four
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_n_threads_sets_onnx_runtime_threads(images):
    extractor = FeatureExtractor(**ONNX, n_threads=1).fit(images)
    options = extractor._get_runtime().engine.session.get_session_options()
    assert options.intra_op_num_threads == 1
    other = FeatureExtractor(**ONNX, n_threads=2).fit(images)
    assert other._get_runtime().engine.session.get_session_options().intra_op_num_threads == 2
    np.testing.assert_allclose(extractor.transform(images), other.transform(images),
                               rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------- precision --

def test_bfloat16_without_native_support_warns_and_runs_float32(images, monkeypatch):
    monkeypatch.setattr(skt.extract._device, "native_bfloat16", lambda device: False)
    with pytest.warns(UserWarning, match=r"precision='bfloat16' is not native on this CPU, "
                                         r"which has neither AVX512-BF16 nor AMX"):
        half = FeatureExtractor(**TINY, precision="bfloat16").fit(images)
    assert half.precision_ == "float32"
    np.testing.assert_array_equal(half.transform(images),
                                  FeatureExtractor(**TINY).fit(images).transform(images))
    with pytest.warns(UserWarning, match="precision='float16' runs on CUDA only"):
        assert FeatureExtractor(**TINY, precision="float16").fit(images).precision_ == "float32"


def test_bfloat16_runs_autocast_in_torch_where_native(images, monkeypatch):
    monkeypatch.setattr(skt.extract._device, "native_bfloat16", lambda device: True)
    half = FeatureExtractor(**{**TINY, "engine": "auto"}, precision="bfloat16").fit(images)
    assert (half.engine_, half.precision_) == ("torch", "bfloat16")
    assert half._get_runtime().engine.dtype == torch.bfloat16
    exact = FeatureExtractor(**TINY).fit(images).transform(images)
    assert 0 < np.abs(half.transform(images) - exact).max() < 0.1 * np.abs(exact).max()
    with pytest.raises(ValueError, match="engine='onnx' runs float32 and int8; "
                                         "precision='bfloat16' runs in the torch engine"):
        FeatureExtractor(**{**TINY, "engine": "onnx"}, precision="bfloat16").fit(images)


def test_dtype_is_deprecated_for_precision(images, monkeypatch):
    monkeypatch.setattr(skt.extract._device, "native_bfloat16", lambda device: True)
    with pytest.warns(FutureWarning, match="dtype is deprecated .* use precision='bfloat16'"):
        assert FeatureExtractor(**TINY, dtype="bfloat16").fit(images).precision_ == "bfloat16"


# ------------------------------------------------------------------- int8 --

INT8 = {**TINY, "engine": "auto", "precision": "int8"}


def _cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_int8_onnx_features_follow_float32_and_calibration_is_reproducible(images, tmp_path):
    from skt.extract._quantize import FLOAT_HEADS

    quantized = FeatureExtractor(**INT8, layers=["layer3", "avgpool"], cache=tmp_path).fit(images)
    assert (quantized.engine_, quantized.precision_) == ("onnx", "int8")
    calibration = quantized.calibration_
    assert set(calibration) == {"ranges", "float_convs", "cosine"}
    assert calibration["float_convs"] in FLOAT_HEADS and calibration["cosine"] >= 0.99
    features = quantized.transform(images)
    exact = FeatureExtractor(**TINY, layers=["layer3", "avgpool"]).fit(images).transform(images)
    assert features.shape == exact.shape == (8, 768) and features.dtype == np.float32
    assert _cosines(features, exact).min() > 0.99
    assert np.abs(features - exact).max() > 1e-5  # it did run in int8
    # The same images calibrate the same graph: equal ranges, equal features.
    again = FeatureExtractor(**INT8, layers=["layer3", "avgpool"]).fit(images)
    assert again.calibration_ == calibration
    np.testing.assert_array_equal(again.transform(images), features)
    # Other images, other ranges: a configuration of its own in the cache.
    other = FeatureExtractor(**INT8, layers=["layer3", "avgpool"], cache=tmp_path).fit(
        images[:2])
    assert other.calibration_["ranges"] != calibration["ranges"]
    assert (other._cache_description()["calibration"]
            != quantized._cache_description()["calibration"])


def test_int8_calibrates_on_evenly_spaced_images_and_keeps_its_graph(images, tmp_path,
                                                                     monkeypatch):
    import skt.extract._quantize as quantize_module

    seen = []
    real = quantize_module.calibrate
    monkeypatch.setattr(skt.extractor, "calibrate",
                        lambda graph, batches, run: seen.append(batches) or real(graph, batches,
                                                                                 run))
    monkeypatch.setattr(quantize_module, "CALIBRATION_IMAGES", 3)
    many = np.concatenate([images, images[::-1]])  # 16 images
    quantized = FeatureExtractor(**INT8, cache=tmp_path, batch_size=2).fit(many)
    batches = np.concatenate(seen[0])
    prepared = FeatureExtractor(**TINY).fit(many).preprocessing_
    expected = torch.stack([preprocess(torch.from_numpy(many[i]).permute(2, 0, 1), prepared)
                            for i in (0, 8, 15)])  # linspace(0, 15, 3).round()
    np.testing.assert_allclose(batches, expected.numpy(), atol=1e-6)
    graphs = sorted(tmp_path.rglob("graph-*.onnx"))
    assert len(graphs) == 2  # the float32 graph and its int8 version
    int8_graph = quantized._graph_path(quantized._layout, "int8")
    assert int8_graph in graphs and quantized._graph_path(quantized._layout, "float32") in graphs
    assert int8_graph.stat().st_size < 0.5 * quantized._graph_path(
        quantized._layout, "float32").stat().st_size  # int8 weights: a quarter of the bytes


def test_int8_pickle_rebuilds_the_graph_from_its_calibration(images, tmp_path, monkeypatch):
    import pickle

    quantized = FeatureExtractor(**INT8, cache=tmp_path / "cache").fit(images)
    expected = quantized.transform(images)
    data = pickle.dumps(quantized)
    for graph in (tmp_path / "cache").rglob("graph-*.onnx"):
        graph.unlink()  # another machine: no graphs, only the pickle
    skt.extractor._RUNTIMES.clear()
    (tmp_path / "cache").rename(tmp_path / "gone")
    monkeypatch.setenv("SKT_CACHE_DIR", str(tmp_path / "elsewhere"))
    loaded = pickle.loads(data)
    loaded.cache = None
    np.testing.assert_array_equal(loaded.transform(images), expected)
    assert len(list((tmp_path / "elsewhere").rglob("graph-*.onnx"))) == 2  # made again


def test_int8_stops_when_the_calibration_is_close_enough(monkeypatch):
    import skt.extract._quantize as quantize_module
    from skt.extract._quantize import _leading

    class Node:
        def __init__(self, op_type, name):
            self.op_type, self.name = op_type, name

    nodes = [Node(op, f"n{i}") for i, op in enumerate(["Conv", "Clip", "Conv", "Add", "Conv"])]
    assert _leading(nodes, 0) == []
    assert _leading(nodes, 1) == ["n0"]
    assert _leading(nodes, 2) == ["n0", "n1", "n2"]
    assert _leading(nodes, 8) == ["n0", "n1", "n2", "n3", "n4"]  # more than there are: all
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 3, 32, 32)).astype(np.float32)]
    exact = FeatureExtractor(**{**TINY, "engine": "onnx"}).fit(np.zeros((1, 32, 32, 3),
                                                                         np.uint8))
    engine = exact._get_runtime().engine
    tries = []
    real = quantize_module._quantize
    monkeypatch.setattr(quantize_module, "_quantize",
                        lambda graph, k, ranges, data: tries.append(k) or real(graph, k, ranges,
                                                                               data))
    monkeypatch.setattr(quantize_module, "MIN_COSINE", 2.0)  # never reached: every try
    result = quantize_module.calibrate(engine.graph, batches,
                                       lambda batch: engine(torch.from_numpy(batch)))
    assert tries == [0, 1, 3, 5, 8] and result["float_convs"] == 8
    tries.clear()
    monkeypatch.setattr(quantize_module, "MIN_COSINE", -1.0)  # reached at once
    assert quantize_module.calibrate(engine.graph, batches,
                                     lambda batch: engine(torch.from_numpy(batch))
                                     )["float_convs"] == 0
    assert tries == [0]


def test_int8_skips_unreadable_calibration_images(image_files, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    files = [str(broken), *map(str, image_files)]
    quantized = FeatureExtractor(**INT8, on_error="skip").fit(files)
    assert quantized.calibration_["cosine"] >= 0.99
    with pytest.raises(ValueError, match=r"precision='int8' calibrates on the images fit "
                                         r"receives, and none of them could be read"):
        FeatureExtractor(**INT8, on_error="skip").fit([str(broken)])


def test_int8_errors_name_what_runs_it(images, monkeypatch):
    with pytest.raises(ValueError, match=r"precision='int8' runs in ONNX Runtime; use "
                                         r"engine='auto' or 'onnx'\."):
        FeatureExtractor(**{**INT8, "engine": "torch"}).fit(images)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=r"precision='int8' runs on the CPU; device is cuda\. "
                                         r"Use device='cpu' or 'auto'\."):
        FeatureExtractor(**INT8, device="cuda").fit(images)
    assert FeatureExtractor(**INT8, device="auto").fit(images)._device().type == "cpu"
    monkeypatch.setattr(skt.extract._engines, "onnx_available", lambda: False)
    with pytest.raises(ImportError, match=r"precision='int8' needs ONNX Runtime: "
                                          r"pip install 'skt\[onnx\]'\."):
        FeatureExtractor(**INT8).fit(images)


def test_int8_frozen_in_a_search_calibrates_once(images, monkeypatch):
    from sklearn.frozen import FrozenEstimator
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline

    quantized = FeatureExtractor(**INT8).fit(images)
    calibration = quantized.calibration_
    monkeypatch.setattr(skt.extractor, "calibrate", lambda *args: pytest.fail("calibrated"))
    search = GridSearchCV(make_pipeline(FrozenEstimator(quantized),
                                        LogisticRegression(max_iter=200)),
                          {"logisticregression__C": [0.1, 1.0]}, cv=2)
    search.fit(np.concatenate([images, images]), [0, 1] * 8)
    assert search.best_estimator_[0].estimator.calibration_ is calibration
