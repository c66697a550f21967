"""Real EfficientNet-Lite ImageNet weights: accuracy, known photos and golden outputs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skt import FeatureExtractor
from skt.backbones import resolve_backbone
from skt.backbones.efficientnet_lite import LITE_VARIANTS
from skt.images import as_image_list, iter_batches

from .conftest import foolbox_imagenet_files, require

pytestmark = pytest.mark.pretrained
GOLDEN = Path(__file__).parent / "data" / "golden_lite0.json"


def _logits(name, images):
    backbone = resolve_backbone(name)
    batches = iter_batches(as_image_list(images), backbone.preprocessing, batch_size=20,
                           num_workers=0)
    with torch.inference_mode():
        return torch.cat([backbone.model(batch) for batch in batches])


@pytest.mark.parametrize("name", sorted(LITE_VARIANTS))
def test_lite_classifies_foolbox_imagenet_samples(name):
    require(LITE_VARIANTS[name].package, "pip install 'skt[lite]'")
    files = foolbox_imagenet_files()
    assert len(files) == 20, ("the foolbox wheel's 20 ImageNet photos are missing: "
                              "pip install --no-deps foolbox==3.3.4 (make test installs it)")
    labels = torch.tensor([int(f.stem.rsplit("_", 1)[1]) for f in files])
    top1 = (_logits(name, [str(f) for f in files]).argmax(1) == labels).sum().item()
    assert top1 >= 17, f"{name}: {top1}/20 top-1"


def test_lite0_names_the_cat_and_the_coffee():
    data = require("skimage.data", "pip install scikit-image")
    logits = _logits("efficientnet_lite0", [data.chelsea(), data.coffee()])
    cat, coffee = logits.topk(2).indices.tolist()
    # Chelsea is a tabby; Lite0 splits her between tiger cat (282) and Egyptian cat (285)
    # within a few points of probability, whichever resampling is used.
    assert cat[0] in (281, 282, 285) and 285 in cat
    assert coffee[0] == 967  # espresso


def test_lite0_golden_features():
    """Penultimate and mid-layer features of chelsea() against stored reference values."""
    data = require("skimage.data", "pip install scikit-image")
    golden = json.loads(GOLDEN.read_text())
    image = [data.chelsea()]
    for key, params in (("pre_logits", {}), ("blocks.10_gem", {"layers": "blocks.10",
                                                               "pooling": "gem"})):
        features = FeatureExtractor(**params, engine="torch").fit(image).transform(image)[0]
        np.testing.assert_allclose(features[:16], golden[key]["first16"], rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(
            [features.mean(), features.std(), features.max()],
            [golden[key]["mean"], golden[key]["std"], golden[key]["max"]], rtol=1e-3, atol=1e-4)


def test_lite0_digits_linear_probe_scores_above_093():
    """5-fold logistic regression on average-pooled Lite0 features of 64 px digits.

    Mid-level blocks transfer best to tiny grayscale digits: block 12 (192
    channels, average-pooled) scores about 0.96, the penultimate 1280 about 0.93.
    """
    from skt.datasets import load_digits_images

    digits = load_digits_images(size=64)
    features = FeatureExtractor(layers="blocks.12", pooling="avg", image_size=64,
                                batch_size=64).fit_transform(digits.images)
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    scores = cross_val_score(head, features, digits.target, cv=5)
    assert scores.mean() >= 0.93, scores


def test_lite0_bfloat16_features_stay_close_to_float32():
    from skt.extract import native_bfloat16
    if not native_bfloat16(torch.device("cpu")):
        pytest.skip("this CPU has neither AVX512-BF16 nor AMX: bfloat16 runs in float32 here")
    files = [str(f) for f in foolbox_imagenet_files()]
    exact = FeatureExtractor(engine="torch").fit(files).transform(files)
    half = FeatureExtractor(precision="bfloat16").fit(files)
    assert (half.engine_, half.precision_) == ("torch", "bfloat16")
    approx = half.transform(files)
    cosine = (exact * approx).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(approx,
                                                                                      axis=1)
    assert cosine.min() > 0.98 and cosine.mean() > 0.995, cosine
    assert np.abs(exact - approx).max() > 1e-4  # it did compute in bfloat16


def test_lite0_int8_features_stay_close_to_float32():
    require("onnxruntime", "pip install 'skt[onnx]'")
    files = [str(f) for f in foolbox_imagenet_files()]
    calibration, held_out = files[::2], files[1::2]
    quantized = FeatureExtractor(precision="int8").fit(calibration)
    assert (quantized.engine_, quantized.precision_) == ("onnx", "int8")
    exact = FeatureExtractor().fit(calibration).transform(held_out)
    approx = quantized.transform(held_out)
    cosine = (exact * approx).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(approx,
                                                                                      axis=1)
    assert cosine.min() > 0.95 and cosine.mean() > 0.985, cosine
    assert np.abs(exact - approx).max() > 1e-3  # it did compute in int8
