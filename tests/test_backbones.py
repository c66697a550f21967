import os
import sys
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

import skt.backbones._registry as registry
from skt.backbones import (
    BackboneFamily,
    Layout,
    WeightsNotFoundError,
    check_layers,
    family_of,
    list_backbones,
    list_layers,
    list_stages,
    register_family,
    resolve_backbone,
)
from skt.backbones.efficientnet_lite import (
    LITE_VARIANTS,
    EfficientNetLite,
    _same_padding,
    convert_lite_state_dict,
    efficientnet_lite,
)
from skt.images import IMAGENET_MEAN, Preprocessing


def test_list_backbones_has_torchvision_and_lite():
    names = list_backbones()
    assert {"resnet18", "vit_b_16", "efficientnet_lite0", "efficientnet_lite2"} <= set(names)
    assert names == sorted(names)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ValueError, match=r"Unknown backbone 'resnet_18'\. Close matches: "
                                         r"\['resnet18'"):
        resolve_backbone("resnet_18")


def test_unknown_weights_lists_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown weights 'IMAGENET9K'.*'IMAGENET1K_V2'"):
        resolve_backbone("resnet50", "IMAGENET9K")


def test_weights_from_state_dict_file(tmp_path):
    source = torchvision.models.resnet18(num_classes=7)
    path = tmp_path / "mine.pth"
    torch.save(source.state_dict(), path)
    backbone = resolve_backbone("resnet18", str(path))
    assert backbone.weights == f"path:{path}"
    assert backbone.model.fc.out_features == 7  # the file's own head size
    assert not backbone.rebuildable
    for name, value in source.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[name], value), name


def test_bad_state_dict_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights='.*missing.pth': no such file"):
        resolve_backbone("resnet18", str(tmp_path / "missing.pth"))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not fit this backbone"):
        resolve_backbone("resnet18", str(tmp_path / "wrong.pth"))


def test_weights_from_safetensors_file(tmp_path, monkeypatch):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source = torchvision.models.resnet18(num_classes=5)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(source.state_dict(), path)
    backbone = resolve_backbone("resnet18", str(path))
    assert backbone.model.fc.out_features == 5
    for name, value in source.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[name], value), name
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"could not be read.*safetensors\.torch\.save_file"):
        resolve_backbone("resnet18", str(tmp_path / "bad.safetensors"))
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r'safetensors file.*pip install "skt\[safe\]"'):
        resolve_backbone("resnet18", str(path))


def test_missing_torchvision_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_backbone("resnet18", "IMAGENET1K_V1")
    message = str(info.value)
    checkpoints = os.path.join(str(tmp_path), "hub", "checkpoints")
    assert "ResNet18_Weights.IMAGENET1K_V1" in message
    assert "TORCH_HOME" in message and checkpoints in message
    assert "resnet18-f37072fd.pth" in message


@pytest.mark.network
@pytest.mark.skipif(not os.environ.get("SKT_NETWORK_TESTS"), reason="set SKT_NETWORK_TESTS=1")
def test_torchvision_weights_download_and_preprocessing():
    backbone = resolve_backbone("resnet50", "IMAGENET1K_V2")
    assert backbone.weights == "ResNet50_Weights.IMAGENET1K_V2"
    assert backbone.preprocessing.resize_size == 232


def test_preprocessing_comes_from_the_weights():
    assert resolve_backbone("resnet50", None).preprocessing.resize_size == 232  # DEFAULT = V2
    b0 = resolve_backbone("efficientnet_b0", None).preprocessing
    assert (b0.crop_size, b0.resize_size, b0.interpolation) == (224, 256, "bicubic")
    lite = resolve_backbone("efficientnet_lite1", None).preprocessing
    assert (lite.crop_size, lite.resize_size, lite.mean, lite.std) == (
        240, 272, (0.5,) * 3, (0.5,) * 3)


def test_image_size_keeps_the_crop_ratio_and_explicit_values_win():
    config = resolve_backbone("resnet18", None, image_size=160, mean=0.5, std=(0.2, 0.3, 0.4)
                              ).preprocessing
    assert (config.crop_size, config.resize_size) == (160, round(160 * 256 / 224))
    assert config.mean == (0.5, 0.5, 0.5) and config.std == (0.2, 0.3, 0.4)
    with pytest.raises(ValueError, match="std must be positive"):
        resolve_backbone("resnet18", None, std=0)


def test_user_module_is_copied_and_gets_imagenet_defaults():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(4, 2))
    backbone = resolve_backbone(module)
    assert backbone.model is not module and backbone.name == "Sequential"
    assert backbone.preprocessing.mean == IMAGENET_MEAN and backbone.weights == "module"
    with pytest.raises(ValueError, match="cannot be applied to a user module"):
        resolve_backbone(module, "IMAGENET1K_V1")


def test_random_init_is_repeatable_with_random_state():
    first = resolve_backbone("resnet18", None, random_state=3)
    second = resolve_backbone("resnet18", None, random_state=3)
    other = resolve_backbone("resnet18", None, random_state=4)
    assert first.rebuildable and not resolve_backbone("resnet18", None).rebuildable
    assert torch.equal(first.model.conv1.weight, second.model.conv1.weight)
    assert not torch.equal(first.model.conv1.weight, other.model.conv1.weight)


def test_list_layers_puts_modules_after_their_last_node():
    names = list_layers("resnet18")
    last = names.index("layer4.1.relu_1")
    assert names[last + 1:last + 4] == ["layer4.1", "layer4", "avgpool"]
    lite = list_layers("efficientnet_lite0")
    assert "blocks.15" in lite and "head_act" in lite
    assert not any("_pad_same" in name for name in lite)  # same-padding convs are one node


def test_unknown_layer_lists_close_names():
    model = resolve_backbone("resnet18", None).model
    with pytest.raises(ValueError, match=r"Unknown layer 'layer5'\. Close matches: \['layer"):
        check_layers(model, "layer5")
    with pytest.raises(ValueError, match="cannot be combined"):
        check_layers(model, ["pre_logits", "layer4"])
    assert check_layers(model, None) == ["pre_logits"]


@pytest.mark.parametrize(("size", "kernel", "stride", "expected"),
                         [(224, 3, 2, (0, 1)), (225, 3, 2, (1, 1)), (112, 5, 2, (1, 2)),
                          (7, 3, 1, (1, 1)), (7, 1, 1, (0, 0))])
def test_tensorflow_same_padding(size, kernel, stride, expected):
    assert _same_padding(size, kernel, stride) == expected


@pytest.mark.parametrize(("name", "blocks", "last_channels"),
                         [("efficientnet_lite0", 16, 320), ("efficientnet_lite1", 21, 320),
                          ("efficientnet_lite2", 21, 352)])
def test_lite_architecture(name, blocks, last_channels):
    model = efficientnet_lite(name, weights=None).eval()
    assert isinstance(model, EfficientNetLite)
    assert model.conv_stem.out_channels == 32 and model.conv_head.out_channels == 1280
    assert len(model.blocks) == blocks
    assert model.blocks[-1].project_conv.out_channels == last_channels
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert not any(leaf.startswith("se_") for leaf in leaves)  # no squeeze-excitation
    assert sum(isinstance(m, torch.nn.ReLU6) for m in model.modules()) == 2  # stem and head
    size = LITE_VARIANTS[name].image_size
    with torch.inference_mode():
        features = model.forward_features(torch.zeros(1, 3, size, size))
    assert features.shape == (1, 1280, size // 32 + (size % 32 > 0), size // 32 + (size % 32 > 0))


def test_lite_key_names_map_from_the_packaged_format():
    converted = convert_lite_state_dict({"_blocks.3._depthwise_conv.weight": 1, "_fc.bias": 2})
    assert converted == {"blocks.3.depthwise_conv.weight": 1, "fc.bias": 2}


# ------------------------------------------------------------------ registry --

def test_named_backbones_declare_classifier_and_stages():
    resnet = resolve_backbone("resnet18", None)
    assert resnet.classifier == "fc"
    assert resnet.stages == (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",),
                             ("layer4",))
    lite = resolve_backbone("efficientnet_lite0", None)
    assert lite.classifier == "fc"
    assert lite.stages[0] == ("conv_stem", "bn0") and lite.stages[-1] == ("conv_head", "bn1")
    # Blocks per stage follow the B0 table (1, 2, 2, 3, 3, 4, 1).
    assert [len(stage) for stage in lite.stages[1:-1]] == [1, 2, 2, 3, 3, 4, 1]
    assert lite.stages[2] == ("blocks.1", "blocks.2")
    assert list_stages("efficientnet_lite2")[1:-1][1] == ("blocks.1", "blocks.2", "blocks.3")
    assert family_of("resnet18").name == "torchvision"
    assert family_of("efficientnet_lite1").name == "efficientnet_lite"
    assert family_of("resnet_18") is None


def test_user_module_stages_are_its_top_level_children():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.stem = nn.Conv2d(3, 4, 3)
            self.act = nn.ReLU()
            self.body = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.body(self.act(self.stem(x * self.scale))).mean((2, 3)))

    backbone = resolve_backbone(Net())
    assert backbone.classifier == "head"
    assert backbone.stages == (("scale", "stem"), ("body",))
    assert list_stages(Net()) == [("scale", "stem"), ("body",)]


def test_a_registered_family_resolves_like_the_built_in_ones(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILIES", list(registry._FAMILIES))

    def build(name, num_classes):
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, num_classes or 10))

    def load(name, weights):
        model = build(name, None)
        nn.init.ones_(model[4].weight)
        return model, f"{name}.{weights}"

    family = BackboneFamily(
        name="tiny", names=lambda: ["tiny_cnn"], build=build, load=load,
        preprocessing=lambda name, weights: Preprocessing(crop_size=48, resize_size=56),
        layout=lambda name: Layout("4", lambda model: (("0", "1"),)),
        weights_on_disk=lambda name: True)
    register_family(family)
    assert "tiny_cnn" in list_backbones() and family_of("tiny_cnn") is family
    backbone = resolve_backbone("tiny_cnn", "DEFAULT", image_size=32)
    assert backbone.weights == "tiny_cnn.DEFAULT" and backbone.rebuildable
    assert bool((backbone.model[4].weight == 1).all())
    assert (backbone.preprocessing.crop_size, backbone.preprocessing.resize_size) == (32, 37)
    assert (backbone.classifier, backbone.stages) == ("4", (("0", "1"),))
    assert list_stages("tiny_cnn") == [("0", "1")]

