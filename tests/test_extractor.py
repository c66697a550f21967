import pickle
import subprocess
import sys
import textwrap
import warnings

import joblib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from skt import FeatureExtractor
from skt.backbones import resolve_backbone
from skt.images import load_image, preprocess

from .conftest import TINY


def _fit(X, **params):
    return FeatureExtractor(**{**TINY, **params}).fit(X)


@pytest.mark.parametrize(
    ("params", "width"),
    [
        ({}, 512),
        ({"layers": "layer3"}, 256),
        ({"layers": ["layer2", "layer3"], "pooling": "avgmax"}, 2 * (128 + 256)),
        ({"layers": "layer3", "pooling": "flatten"}, 256 * 2 * 2),
        ({"layers": "layer4", "pooling": "gem"}, 512),
    ],
)
def test_output_shape_and_dtype(images, params, width):
    extractor = _fit(images, **params)
    features = extractor.transform(images)
    assert features.shape == (8, width) and features.dtype == np.float32
    assert extractor.n_features_out_ == width
    assert len(extractor.get_feature_names_out()) == width


def test_features_equal_a_hand_computation(images):
    extractor = _fit(images, layers="layer3")
    backbone = resolve_backbone("resnet18", None, image_size=32, random_state=0)
    body = create_feature_extractor(backbone.model.eval(), return_nodes=["layer3"])
    x = torch.stack([preprocess(load_image(image), backbone.preprocessing) for image in images])
    with torch.no_grad():
        expected = body(x)["layer3"].mean((2, 3)).numpy()
    np.testing.assert_allclose(extractor.transform(images), expected, rtol=1e-4, atol=1e-5)


def test_default_layer_is_the_classifier_input(images):
    extractor = _fit(images)
    backbone = resolve_backbone("resnet18", None, image_size=32, random_state=0)
    backbone.model.fc = nn.Identity()
    x = torch.stack([preprocess(load_image(image), backbone.preprocessing) for image in images])
    with torch.no_grad():
        expected = backbone.model.eval()(x).numpy()
    np.testing.assert_allclose(extractor.transform(images), expected, rtol=1e-4, atol=1e-5)
    assert extractor.layers_ == ["pre_logits"]


def test_layers_are_concatenated_in_the_given_order(images):
    both = _fit(images, layers=["layer3", "layer2"]).transform(images)
    layer3 = _fit(images, layers="layer3").transform(images)
    layer2 = _fit(images, layers="layer2").transform(images)
    np.testing.assert_allclose(both, np.hstack([layer3, layer2]), rtol=1e-5, atol=1e-6)


def test_rows_follow_the_input_order_and_batching_does_not_matter(images):
    extractor = _fit(images, batch_size=3)
    forward = extractor.transform(images)
    np.testing.assert_allclose(extractor.transform(images[::-1]), forward[::-1], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(extractor.set_params(batch_size=8).transform(images), forward,
                               rtol=1e-5, atol=1e-6)


def test_files_pil_arrays_and_tensors_give_the_same_features(images, image_files):
    extractor = _fit(images)
    reference = extractor.transform(images)
    pil = [Image.open(path) for path in image_files]
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2)
    for X in (image_files, pil, tensor, list(images)):
        np.testing.assert_allclose(extractor.transform(X), reference, rtol=1e-5, atol=1e-6)


def test_decoding_workers_keep_rows_aligned(image_files):
    extractor = _fit(image_files, batch_size=2)
    serial = extractor.transform(image_files)
    parallel = extractor.set_params(num_workers=2).transform(image_files)
    np.testing.assert_array_equal(parallel, serial)


def test_bad_item_error_reaches_the_user(image_files, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really")
    extractor = _fit(image_files)
    with pytest.raises(ValueError, match=r"Image 8 \('.*broken\.jpg'\) cannot be read"):
        extractor.transform([*image_files, str(broken)])


class Untraceable(nn.Module):
    """Data-dependent control flow: FX cannot trace it, hooks still work."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = x.relu()
        return self.head(self.pool(x).flatten(1))


def test_user_module_untraceable_uses_module_names(images):
    module = Untraceable()
    extractor = FeatureExtractor(module, layers="conv", image_size=32, engine="torch").fit(images)
    expected_conv = module.conv(torch.stack(
        [preprocess(load_image(i), extractor.preprocessing_) for i in images])).amax((2, 3))
    features = extractor.set_params(pooling="max").fit(images).transform(images)
    np.testing.assert_allclose(features, expected_conv.detach().numpy(), rtol=1e-4, atol=1e-5)
    with pytest.warns(RuntimeWarning, match=r"ONNX export failed \(Failed to export the model "
                                            r"with torch\.export\); using the torch engine"):
        auto = FeatureExtractor(module, image_size=32).fit(images)  # data-dependent branch
    assert auto.engine_ == "torch" and auto.transform(images).shape == (8, 4)
    assert module.head.out_features == 2  # the user's module is left as it was


def test_mean_and_std_reach_the_preprocessing(images):
    extractor = _fit(images, mean=0.5, std=0.25)
    assert extractor.preprocessing_.mean == (0.5,) * 3
    assert extractor.preprocessing_.std == (0.25,) * 3


def test_verbose_shows_a_progress_bar(images, capsys):
    _fit(images, verbose=1).transform(images)
    assert "8/8" in capsys.readouterr().err


def test_unavailable_device_fails_at_fit(images, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda' is not available on this machine"):
        _fit(images, device="cuda")


def test_extractor_fitted_on_cuda_falls_back_to_cpu_when_loaded(images, monkeypatch):
    extractor = _fit(images)
    reference = extractor.transform(images)
    extractor.device = "cuda"  # as if fitted on a GPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded = pickle.loads(pickle.dumps(extractor))
    with pytest.warns(RuntimeWarning, match="not available on this machine; using the CPU"):
        np.testing.assert_array_equal(loaded.transform(images), reference)


def test_pickle_leaves_out_weights_that_rebuild_by_name(images):
    rebuildable = _fit(images)
    carried = _fit(images, random_state=None)
    model, runtime = rebuildable.model_, rebuildable._runtime
    small, large = pickle.dumps(rebuildable), pickle.dumps(carried)
    # Pickling leaves the original as it was: its network and engines stay in place.
    assert rebuildable.model_ is model and rebuildable._runtime is runtime is not None
    assert len(small) < 100_000 < 40_000_000 < len(large)  # ResNet-18 is 45 MB of floats
    for extractor, blob in ((rebuildable, small), (carried, large)):
        np.testing.assert_array_equal(pickle.loads(blob).transform(images),
                                      extractor.transform(images))


def test_pipeline_survives_joblib_in_a_fresh_process(images, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    y = np.arange(8) % 2
    pipe = make_pipeline(_fit(images), LogisticRegression()).fit(images, y)
    joblib.dump(pipe, tmp_path / "pipe.joblib")
    np.save(tmp_path / "X.npy", images)
    script = textwrap.dedent(f"""
        import joblib, numpy as np
        pipe = joblib.load({str(tmp_path / 'pipe.joblib')!r})
        X = np.load({str(tmp_path / 'X.npy')!r})
        np.save({str(tmp_path / 'out.npy')!r}, pipe[0].transform(X))
        np.save({str(tmp_path / 'proba.npy')!r}, pipe.predict_proba(X))
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), pipe[0].transform(images))
    np.testing.assert_array_equal(np.load(tmp_path / "proba.npy"), pipe.predict_proba(images))


def test_rebuilt_weights_must_match(images):
    extractor = _fit(images)
    blob = pickle.dumps(extractor)
    loaded = pickle.loads(blob)
    loaded._fingerprint = "0" * 32  # as if torchvision had changed the weights since
    with pytest.raises(RuntimeError, match="differ from those this extractor was fitted with"):
        loaded.transform(images)


def test_no_warnings_in_normal_use(images):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fit(images, layers="layer2").transform(images)
