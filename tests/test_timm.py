"""``backbone="timm:<name>"``: timm models as a backbone family, random init and offline."""

from __future__ import annotations

import pickle
import sys
import time
import urllib.error

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm", reason="the timm extra is not installed")
huggingface_hub = pytest.importorskip("huggingface_hub")
safetensors_torch = pytest.importorskip("safetensors.torch")

import skt.backbones._timm as timm_family  # noqa: E402
from skt import FeatureExtractor, FineTuneClassifier  # noqa: E402
from skt.backbones import (  # noqa: E402
    WeightsNotFoundError,
    family_of,
    layer_names,
    list_backbones,
    list_layers,
    list_stages,
    resolve_backbone,
)
from skt.images import load_image, preprocess  # noqa: E402

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# name: (classifier, crop, resize = floor(crop / crop_pct), mean and std), read off timm's
# pretrained configurations: convnext_atto.d2_in1k 224 px at crop_pct 0.875, resnet10t.c3_in1k
# 176 px at 0.875, vit_tiny_patch16_224.augreg_in21k_ft_in1k and swin_tiny's ms_in1k 224 px
# at 0.9; all bicubic.
EXPECTED = {
    "convnext_atto": ("head.fc", 224, 256, IMAGENET),
    "resnet10t": ("fc", 176, 201, IMAGENET),
    "vit_tiny_patch16_224": ("head", 224, 248, ((0.5,) * 3, (0.5,) * 3)),
    "swin_tiny_patch4_window7_224": ("head.fc", 224, 248, IMAGENET),
}


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("name", EXPECTED)
def test_resolves_with_timm_preprocessing_classifier_and_stages(name):
    classifier, crop, resize, (mean, std) = EXPECTED[name]
    backbone = resolve_backbone(f"timm:{name}", weights=None, random_state=0)
    config = backbone.preprocessing
    assert (config.crop_size, config.resize_size, config.interpolation, config.crop_mode) == (
        crop, resize, "bicubic", "center")
    assert (config.mean, config.std) == (mean, std)
    assert backbone.classifier == classifier
    assert backbone.model.get_submodule(classifier).out_features == 1000
    assert backbone.weights is None and backbone.name == f"timm:{name}"
    # every parameter outside the classifier is in exactly one stage
    prefixes = [prefix for stage in backbone.stages for prefix in stage]
    params = [param for param, _ in backbone.model.named_parameters()]
    for prefix in prefixes:
        assert any(_inside(param, prefix) for param in params), f"{prefix!r} matches nothing"
    for param in params:
        covered = sum(_inside(param, prefix) for prefix in prefixes)
        assert covered == (0 if _inside(param, classifier) else 1), (param, covered)


def test_stages_follow_timm_groups_input_side_first():
    assert list_stages("timm:convnext_atto") == [
        ("stem",), ("stages.0",), ("stages.1",), ("stages.2",), ("stages.3",), ("head.norm",)]
    vit = list_stages("timm:vit_tiny_patch16_224")
    # the embedding parameters, twelve blocks, the final norm with the last block
    assert vit[0] == ("cls_token", "pos_embed", "patch_embed") and len(vit) == 13
    assert vit[-1] == ("blocks.11", "norm")
    # PoolFormer declares no group_matcher: its containers' items become the stages
    assert list_stages("timm:poolformer_s12")[1:5] == [
        ("stages.0",), ("stages.1",), ("stages.2",), ("stages.3",)]


def test_tag_in_the_name_picks_its_configuration():
    tv = resolve_backbone("timm:resnet18.tv_in1k", weights=None).preprocessing
    assert (tv.crop_size, tv.resize_size, tv.interpolation) == (224, 256, "bilinear")
    family = family_of("timm:resnet18")
    a3 = family.preprocessing("timm:resnet18", "a3_in1k")  # floor(160 / 0.95)
    assert (a3.crop_size, a3.resize_size, a3.interpolation) == (160, 168, "bicubic")
    squash = family.preprocessing("timm:convnextv2_nano.fcmae_ft_in22k_in1k_384", None)
    assert (squash.crop_size, squash.resize_size, squash.crop_mode) == (384, 384, "squash")
    # explicit values beat the weights' configuration
    small = resolve_backbone("timm:resnet18.tv_in1k", weights=None, image_size=112, mean=0.5)
    assert (small.preprocessing.crop_size, small.preprocessing.resize_size) == (112, 128)
    assert small.preprocessing.mean == (0.5,) * 3
    in21k = resolve_backbone("timm:vit_tiny_patch16_224.augreg_in21k", weights=None)
    assert in21k.model.head.out_features == 21843


def test_headless_models_have_no_classifier_and_multi_head_ones_are_refused():
    dinov2 = family_of("timm:vit_small_patch14_dinov2").layout("timm:vit_small_patch14_dinov2")
    assert dinov2.classifier is None  # built with num_classes=0: its output is the features
    with pytest.raises(ValueError, match=r"2 classifier heads \('head', 'head_dist'\)"):
        family_of("timm:deit_tiny_distilled_patch16_224").layout(
            "timm:deit_tiny_distilled_patch16_224")


def test_family_owns_the_prefix_without_listing_timm():
    assert family_of("timm:convnext_atto").name == "timm"
    assert family_of("timm:anything").name == "timm"  # timm itself says whether it exists
    names = list_backbones()
    assert not any(name.startswith("timm:") for name in names) and "resnet18" in names
    assert family_of("resnet18").name == "torchvision"


def test_unknown_names_and_tags_list_close_ones():
    with pytest.raises(ValueError, match=r"Unknown timm model 'convnext_ato'.*Close matches: "
                                         r"\['convnext_atto'"):
        resolve_backbone("timm:convnext_ato", weights=None)
    with pytest.raises(ValueError, match=r"Unknown weights 'c3_in1' .*Close matches: "
                                         r"\['c3_in1k'\].*'DEFAULT', 'c3_in1k'"):
        resolve_backbone("timm:resnet10t", weights="c3_in1")
    with pytest.raises(ValueError, match="pass the tag in one place"):
        resolve_backbone("timm:resnet18.tv_in1k", weights="a1_in1k")


def test_without_timm_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r'needs timm.*pip install "skt\[timm\]"'):
        resolve_backbone("timm:convnext_atto", weights=None)


def test_list_layers_traces_with_timm_settings():
    layers = list_layers("timm:convnext_atto")
    assert {"stem", "stages.3", "stages.3.blocks.1", "head.norm", "head.fc"} <= set(layers)
    assert layers.index("stages.2") < layers.index("stages.3")
    # MobileViT traces only with timm's leaf modules: node names, not the hook fallback
    model = resolve_backbone("timm:mobilevit_xxs", weights=None).model
    names, traced = layer_names(model)
    assert traced and "stages.4" in names


def test_feature_extractor_pickles_and_rebuilds_by_name(images):
    extractor = FeatureExtractor("timm:convnext_atto", weights=None, random_state=0,
                                 image_size=64, engine="torch").fit(images[:2])
    features = extractor.transform(images[:2])
    assert features.shape == (2, timm.create_model("convnext_atto").num_features)
    blob = pickle.dumps(extractor)
    assert len(blob) < 100_000  # rebuilt by name: no weights inside
    np.testing.assert_array_equal(pickle.loads(blob).transform(images[:2]), features)


def test_fine_tune_replaces_the_head_and_freezes_stages(images):
    y = np.array(["a", "b"] * 4)
    model = FineTuneClassifier("timm:resnet10t", weights=None, image_size=32, max_iter=1,
                               batch_size=4, freeze=2, random_state=0).fit(images, y)
    assert set(model.predict(images)) <= {"a", "b"}
    assert model.predict_proba(images).shape == (8, 2)
    assert model.model_.fc.out_features == 2


def test_fine_tune_refuses_a_convolution_classifier(images):
    # DLA's classifier is a 1x1 convolution: there is no linear head to replace.
    with pytest.raises(ValueError, match=r"The classifier 'fc' of timm:dla46_c is a Conv2d, not "
                                         r"an nn.Linear, so FineTuneClassifier cannot give it"):
        FineTuneClassifier("timm:dla46_c", weights=None, image_size=32, max_iter=1,
                           random_state=0).fit(images, np.array(["a", "b"] * 4))


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Empty weight caches and no network: the reachability check fails at once."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(timm_family.urllib.request, "urlopen", unreachable)
    return tmp_path


def test_missing_weights_say_where_to_put_them(offline):
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_backbone("timm:convnext_atto", "DEFAULT")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    for part in ("'convnext_atto.d2_in1k'", "no network", str(offline / "hf"), "HF_HUB_CACHE",
                 "hf download timm/convnext_atto.d2_in1k model.safetensors",
                 "models--timm--convnext_atto.d2_in1k",
                 "https://huggingface.co/timm/convnext_atto.d2_in1k/resolve/main/"
                 "model.safetensors",
                 "weights='path/to/model.safetensors'", "weights=None"):
        assert part in message, part
    assert not family_of("timm:convnext_atto").weights_on_disk("timm:convnext_atto")


def test_weights_in_the_hub_cache_load_without_network(offline):
    source = timm.create_model("resnet10t")
    snapshot = offline / "hf" / "models--timm--resnet10t.c3_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    safetensors_torch.save_file(source.state_dict(), snapshot / "model.safetensors")
    assert family_of("timm:resnet10t").weights_on_disk("timm:resnet10t")
    backbone = resolve_backbone("timm:resnet10t", "DEFAULT")
    assert backbone.weights == "resnet10t.c3_in1k" and backbone.rebuildable
    for key, value in source.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[key], value), key


def test_weights_from_a_safetensors_file(tmp_path, images):
    source = timm.create_model("convnext_atto", num_classes=3).eval()
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(source.state_dict(), path)
    backbone = resolve_backbone("timm:convnext_atto", str(path))
    assert backbone.weights == f"path:{path}" and not backbone.rebuildable
    assert backbone.model.head.fc.out_features == 3  # the file's own head size
    extractor = FeatureExtractor("timm:convnext_atto", weights=str(path), image_size=64,
                                 engine="torch").fit(images[:2])
    batch = torch.stack([preprocess(load_image(image), extractor.preprocessing_)
                         for image in images[:2]])
    with torch.no_grad():
        expected = source.forward_head(source.forward_features(batch), pre_logits=True)
    np.testing.assert_allclose(extractor.transform(images[:2]), expected.numpy(),
                               rtol=1e-4, atol=1e-5)
