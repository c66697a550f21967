"""Declared torchvision layouts, checked against the models built on the meta device."""

from __future__ import annotations

import functools
import itertools
from unittest import mock

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import regnet

from skt.backbones._families import torchvision_layout

NAMES = torchvision.models.list_models(module=torchvision.models)


def _on_cpu(build):
    """A classmethod running ``build`` outside the meta device."""

    def wrapper(cls, *args, **kwargs):
        with torch.device("cpu"):
            return build(cls, *args, **kwargs)

    return classmethod(wrapper)


@functools.cache
def _model(name: str, **kwargs) -> nn.Module:
    """``name`` built on the meta device: no memory, no download, no weights."""
    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("init_weights", False)  # True is only slower; None also warns
    # RegNet computes its block widths with tensors and reads them back with .tolist(),
    # which a meta tensor cannot do: those few numbers are computed on the CPU.
    block_params = _on_cpu(regnet.BlockParams.__dict__["from_init_params"].__func__)
    with mock.patch.object(regnet.BlockParams, "from_init_params", block_params), \
            torch.device("meta"):
        # In eval mode GoogLeNet and Inception return only the logits, not their aux outputs.
        return torchvision.models.get_model(name, weights=None, **kwargs).eval()


@functools.cache
def _forward(name: str) -> tuple[dict[str, int], torch.Tensor, list[torch.Tensor]]:
    """A meta forward pass: the order modules are first called in, the output, and what the
    classifier returned."""
    model = _model(name)
    classifier = torchvision_layout(name).classifier
    order: dict[str, int] = {}
    outputs = []

    def called(module_name: str) -> None:  # a pre-hook's return value would replace the input
        order.setdefault(module_name, len(order))

    hooks = [module.register_forward_pre_hook(lambda _m, _x, key=key: called(key))
             for key, module in model.named_modules()]
    if classifier is not None:
        hooks.append(model.get_submodule(classifier).register_forward_hook(
            lambda _m, _x, y: outputs.append(y)))
    size = 299 if name == "inception_v3" else getattr(model, "image_size", 224)
    with torch.no_grad():
        logits = model(torch.empty(1, 3, size, size, device="meta"))
    for hook in hooks:
        hook.remove()
    return order, logits, outputs


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _stages(name: str) -> tuple[tuple[str, ...], ...]:
    return torchvision_layout(name).stages(_model(name))


@pytest.mark.parametrize("name", NAMES)
def test_classifier_makes_the_logits(name):
    classifier = torchvision_layout(name).classifier
    if name.startswith("squeezenet"):
        assert classifier is None
        return
    layer = _model(name).get_submodule(classifier)
    assert isinstance(layer, nn.Linear)
    assert layer.out_features == 1000
    _, logits, outputs = _forward(name)
    assert logits.shape == (1, 1000)
    assert len(outputs) == 1 and outputs[0] is logits


@pytest.mark.parametrize("name", NAMES)
def test_stages_cover_each_parameter_once(name):
    classifier = torchvision_layout(name).classifier
    stages = _stages(name)
    params = [param for param, _ in _model(name).named_parameters()]
    assert all(stages), f"empty stage in {stages}"
    prefixes = [prefix for stage in stages for prefix in stage]
    for prefix in prefixes:
        assert any(_inside(param, prefix) for param in params), f"{prefix!r} matches nothing"
    for param in params:
        in_head = classifier is not None and _inside(param, classifier)
        covered = sum(_inside(param, prefix) for prefix in prefixes)
        assert covered == (0 if in_head else 1), f"{param!r} is in {covered} stages"


@pytest.mark.parametrize("name", NAMES)
def test_stages_are_in_forward_order(name):
    order, _, _ = _forward(name)
    modules = dict(_model(name).named_modules())
    spans = []
    for stage in _stages(name):
        # Parameter prefixes (class_token, encoder.pos_embedding) are not called; their
        # stage is placed by its modules.
        calls = [index for module, index in order.items()
                 if any(_inside(module, prefix) for prefix in stage if prefix in modules)]
        assert calls, f"no module of {stage} runs in the forward pass"
        spans.append((min(calls), max(calls)))
    for (_, last), (first, _) in itertools.pairwise(spans):
        assert last < first, f"stages overlap or are out of order: {spans}"


EXPECTED = {
    "resnet18": (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)),
    "efficientnet_b0": (
        ("features.0",), ("features.1",), ("features.2",), ("features.3",), ("features.4",),
        ("features.5",), ("features.6",), ("features.7",), ("features.8",),
    ),
    "mobilenet_v3_small": (
        ("features.0",),
        ("features.1",),
        ("features.2", "features.3"),
        ("features.4", "features.5", "features.6"),
        ("features.7", "features.8"),
        ("features.9", "features.10", "features.11"),
        ("features.12",),
        ("classifier.0",),
    ),
    "vgg11": (
        ("features.0",),
        ("features.3",),
        ("features.6", "features.8"),
        ("features.11", "features.13"),
        ("features.16", "features.18"),
        ("classifier.0", "classifier.3"),
    ),
    "convnext_tiny": (
        ("features.0",),
        ("features.1",),
        ("features.2", "features.3"),
        ("features.4", "features.5"),
        ("features.6", "features.7"),
        ("classifier.0",),
    ),
    "vit_b_16": (
        ("conv_proj", "class_token", "encoder.pos_embedding"),
        ("encoder.layers.encoder_layer_0",),
        ("encoder.layers.encoder_layer_1",),
        ("encoder.layers.encoder_layer_2",),
        ("encoder.layers.encoder_layer_3",),
        ("encoder.layers.encoder_layer_4",),
        ("encoder.layers.encoder_layer_5",),
        ("encoder.layers.encoder_layer_6",),
        ("encoder.layers.encoder_layer_7",),
        ("encoder.layers.encoder_layer_8",),
        ("encoder.layers.encoder_layer_9",),
        ("encoder.layers.encoder_layer_10",),
        ("encoder.layers.encoder_layer_11", "encoder.ln"),
    ),
    "densenet121": (
        ("features.conv0", "features.norm0"),
        ("features.denseblock1",),
        ("features.transition1", "features.denseblock2"),
        ("features.transition2", "features.denseblock3"),
        ("features.transition3", "features.denseblock4", "features.norm5"),
    ),
    "regnet_y_400mf": (
        ("stem",),
        ("trunk_output.block1",),
        ("trunk_output.block2",),
        ("trunk_output.block3",),
        ("trunk_output.block4",),
    ),
    "swin_t": (
        ("features.0",),
        ("features.1",),
        ("features.2", "features.3"),
        ("features.4", "features.5"),
        ("features.6", "features.7", "norm"),
    ),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_declared_stages(name):
    assert _stages(name) == EXPECTED[name]


def test_auxiliary_classifiers_go_with_the_stage_they_read():
    with_aux = torchvision_layout("googlenet").stages(_model("googlenet"))
    without = torchvision_layout("googlenet").stages(_model("googlenet", aux_logits=False))
    assert with_aux[3][-2:] == ("aux1", "aux2")
    assert without[3] == with_aux[3][:-2]
    inception = torchvision_layout("inception_v3").stages(_model("inception_v3", aux_logits=False))
    assert "AuxLogits" not in inception[3]


def test_mobilenet_with_other_blocks_raises():
    model = _model("mobilenet_v2", inverted_residual_setting=((1, 16, 1, 1), (6, 24, 2, 2)))
    with pytest.raises(ValueError, match="3 blocks"):
        torchvision_layout("mobilenet_v2").stages(model)


@pytest.mark.parametrize("name", ["resnet17", "fasterrcnn_resnet50_fpn", "resnet18.a1"])
def test_unknown_name_raises(name):
    with pytest.raises(ValueError, match=repr(name).replace(".", r"\.")):
        torchvision_layout(name)


def test_unknown_name_lists_close_names():
    with pytest.raises(ValueError, match="Close names: 'resnet18'"):
        torchvision_layout("resnet17")
