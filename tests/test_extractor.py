import pickle
import subprocess
import sys
import textwrap
import threading
import warnings

import joblib
import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from sklearn.utils._param_validation import InvalidParameterError
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import skt.extractor
from skt import FeatureExtractor, cache_info
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


# ------------------------------------------------------------- bad items --

def test_closed_and_truncated_pil_images_through_transform(images, image_files, tmp_path):
    extractor = _fit(images)
    closed = Image.open(image_files[2])
    closed.close()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(image_files[0], "rb").read()[:200])
    for bad, cause in ((closed, "Operation on closed image"),
                       (Image.open(truncated), "image file is truncated")):
        with pytest.raises(ValueError, match=rf"^Image 1 \(a PIL image opened from .*\) cannot "
                                             rf"be read as an image \({cause}"):
            extractor.transform([images[0], bad, images[1]])


def test_exif_orientation_gives_the_features_of_the_turned_image(images, tmp_path):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # shown turned a quarter clockwise
    path = tmp_path / "tagged.png"
    Image.fromarray(images[0]).save(path, exif=exif)
    by_hand = np.ascontiguousarray(np.rot90(images[0], k=-1))
    extractor = _fit(images)
    expected = extractor.transform([by_hand])
    np.testing.assert_allclose(extractor.transform([str(path)]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(extractor.transform([Image.open(path)]), expected, rtol=1e-5,
                               atol=1e-6)
    assert not np.allclose(extractor.transform([images[0]]), expected, rtol=1e-3, atol=1e-3)


def test_read_only_or_integer_out_is_refused(images):
    extractor = _fit(images)
    frozen = np.zeros((8, 512), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="out must be a writable float array; it is a "
                                         "read-only float32 array"):
        extractor.transform_into(images, frozen)
    with pytest.raises(ValueError, match="it is a writable int64 array"):
        extractor.transform_into(images, np.zeros((8, 512), np.int64))


# ------------------------------------------------------ on_error="skip" --

@pytest.fixture
def damaged(image_files, tmp_path):
    """Six files with two bad ones: index 1 is not an image, index 4 does not exist."""
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    return [image_files[0], str(broken), *image_files[1:3], str(tmp_path / "gone.png"),
            image_files[3]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_gives_nan_rows_a_warning_and_skipped_(damaged, image_files, num_workers):
    good = [0, 2, 3, 5]
    alone = _fit(image_files).transform([damaged[i] for i in good])
    extractor = _fit(damaged, on_error="skip", batch_size=2, num_workers=num_workers)
    assert extractor.skipped_ == []
    with pytest.warns(UserWarning, match=r"^Skipped 2 of 6 images that could not be used; "
                                         r"their rows are NaN and skipped_ lists them\. "
                                         r"Image 1 \('.*broken\.png'\) cannot be read"):
        features = extractor.transform(damaged)
    assert np.isnan(features).all(axis=1).tolist() == [False, True, False, False, True, False]
    np.testing.assert_allclose(features[good], alone, rtol=1e-5, atol=1e-6)
    assert [index for index, _ in extractor.skipped_] == [1, 4]
    assert extractor.skipped_[0][1].startswith(f"Image 1 ({damaged[1]!r}) cannot be read as an "
                                               "image (cannot identify image file")
    assert extractor.skipped_[1][1].startswith(f"Image 4 ({damaged[4]!r}): the file does not "
                                               "exist")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extractor.transform(image_files[:2])
    assert extractor.skipped_ == []


def test_skip_works_for_every_kind_of_item(images, image_files):
    closed = Image.open(image_files[0])
    closed.close()
    nan = np.full((8, 8), np.nan)
    X = [images[0], closed, nan, "nope.png", 7, torch.zeros(3, 0, 4), images[1]]
    extractor = _fit(images, on_error="skip")
    with pytest.warns(UserWarning, match=r"Skipped 5 of 7 images.* \.\.\. and 2 more\.$"):
        features = extractor.transform(X)
    assert [index for index, _ in extractor.skipped_] == [1, 2, 3, 4, 5]
    assert np.isnan(features[1:6]).all()
    np.testing.assert_allclose(features[[0, 6]], _fit(images).transform(images[:2]),
                               rtol=1e-5, atol=1e-6)


def test_skip_still_raises_for_x_as_a_whole(images):
    extractor = _fit(images, on_error="skip")
    with pytest.raises(TypeError, match="X is a int"):
        extractor.transform(42)
    with pytest.raises(ValueError, match="X is empty"):
        extractor.transform([])
    stack = images.astype(np.float32) / 255
    stack[3, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="Image 3 contains NaN"):
        extractor.transform(stack)


def test_skip_never_caches_a_failure_and_retries_it(damaged, image_files, tmp_path):
    extractor = _fit(damaged, on_error="skip", cache=tmp_path / "cache")
    with pytest.warns(UserWarning, match="Skipped 2 of 6"):
        first = extractor.transform(damaged)
    assert cache_info(tmp_path / "cache")["entries"] == 4
    Image.open(image_files[4]).save(damaged[1], format="PNG")  # repaired in place
    with pytest.warns(UserWarning, match=r"Skipped 1 of 6 .* Image 4 "):
        second = extractor.transform(damaged)
    assert cache_info(tmp_path / "cache")["entries"] == 5
    np.testing.assert_allclose(second[1], _fit(image_files).transform([image_files[4]])[0],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.isnan(second).any(axis=1), [False] * 4 + [True, False])
    np.testing.assert_allclose(second[[0, 2, 3, 5]], first[[0, 2, 3, 5]], rtol=1e-6, atol=1e-7)


def test_fit_checks_x_as_on_error_says(damaged):
    with pytest.raises(ValueError, match=r"Image 4 \('.*gone\.png'\): the file does not exist"):
        _fit(damaged)
    assert _fit(damaged, on_error="skip").n_features_out_ == 512
    with pytest.raises(InvalidParameterError, match="'on_error' parameter"):
        _fit(damaged, on_error="ignore")


def test_a_decoding_error_leaves_no_thread_behind(image_files, damaged):
    extractor = _fit(image_files, batch_size=2, num_workers=2)
    with pytest.raises(ValueError, match=r"Image 8 \('.*broken\.png'\) cannot be read"):
        extractor.transform([*image_files, damaged[1], *image_files])
    assert [t for t in threading.enumerate() if t.name.startswith("skt-decode")] == []


# ------------------------------------------------------ test-time augmentation --

@pytest.mark.parametrize("tta", ["flip", "dihedral"])
@pytest.mark.parametrize("pooling", ["avg", "gem", "max"])
def test_tta_is_the_mean_of_the_views_features(images, tta, pooling):
    from skt.images import dihedral_view
    square = images[:, :40, :40]  # turns keep the shape; squash keeps the whole image
    params = {"layers": "layer3", "pooling": pooling, "crop_mode": "squash", "image_size": 40}
    plain = _fit(square, **params)
    views = (0, 4) if tta == "flip" else range(8)
    per_view = [plain.transform(np.stack([
        dihedral_view(torch.from_numpy(a).permute(2, 0, 1), v).permute(1, 2, 0).numpy()
        for a in square])) for v in views]
    augmented = _fit(square, **params, tta=tta).transform(square)
    np.testing.assert_allclose(augmented, np.mean(per_view, axis=0), rtol=1e-5, atol=1e-6)
    assert np.abs(augmented - per_view[0]).max() > 1e-3  # the views do differ


def test_tta_is_cached_as_its_own_configuration(images, tmp_path):
    plain = _fit(images, cache=tmp_path).transform(images)
    flipped = _fit(images, cache=tmp_path, tta="flip").transform(images)
    configs = cache_info(tmp_path)["configs"]
    assert sorted(c["description"].get("tta") or "none" for c in configs) == ["flip", "none"]
    assert np.abs(plain - flipped).max() > 1e-4
    np.testing.assert_array_equal(_fit(images, cache=tmp_path, tta="flip").transform(images),
                                  flipped)


# ------------------------------------------------------------- pooling warning --

def test_pooling_at_an_already_pooled_layer_warns_once(images):
    params = {**TINY, "random_state": 123}  # a configuration no other test has warned about
    with pytest.warns(UserWarning, match=r"pooling='gem' has no effect: layer 'pre_logits' of "
                                         r"resnet18 is already pooled"):
        gem = FeatureExtractor(**params, pooling="gem").fit(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FeatureExtractor(**params, pooling="gem").fit(images)  # a GridSearchCV refit: quiet
        avg = FeatureExtractor(**params).fit(images)  # the default pooling: quiet
    np.testing.assert_array_equal(gem.transform(images), avg.transform(images))
    assert list(gem.get_feature_names_out()) == list(avg.get_feature_names_out())


# ------------------------------------------------------------------ crop mode --

def test_squash_keeps_the_whole_image_and_center_crops_the_middle():
    # A 28 px item with a bright 1 px frame, as framed datasets have.
    item = np.zeros((1, 28, 28, 3), dtype=np.uint8)
    item[:, :1], item[:, -1:], item[:, :, :1], item[:, :, -1:] = 255, 255, 255, 255
    params = {"image_size": 64, "mean": 0.0, "std": 1.0, "layers": "conv1", "pooling": "max"}
    center, squash = _fit(item, **params), _fit(item, **params, crop_mode="squash")
    assert (center.preprocessing_.resize_size, squash.preprocessing_.resize_size) == (73, 64)
    pixels = {name: preprocess(torch.from_numpy(item[0]).permute(2, 0, 1), e.preprocessing_)
              for name, e in (("center", center), ("squash", squash))}
    assert float(pixels["squash"][0, 0, 32]) > 0.9  # the border is in the squashed input
    assert float(pixels["center"][0, 0, 32]) < 0.1  # and cut off by the centre crop
    assert np.abs(center.transform(item) - squash.transform(item)).max() > 1e-4


def test_crop_mode_is_validated(images):
    with pytest.raises(InvalidParameterError, match="crop_mode"):
        _fit(images, crop_mode="border")


def test_extractors_that_differ_only_in_preprocessing_do_not_share_it(images):
    # They share one network in memory; each must still preprocess its own way.
    first = _fit(images, layers="conv1", mean=0.5).transform(images)
    second = _fit(images, layers="conv1", mean=0.2).transform(images)
    squashed = _fit(images, layers="conv1", mean=0.2, crop_mode="squash").transform(images)
    skt.extractor._RUNTIMES.clear()
    np.testing.assert_array_equal(_fit(images, layers="conv1", mean=0.2).transform(images),
                                  second)
    assert np.abs(first - second).max() > 1e-3 and np.abs(second - squashed).max() > 1e-3
