"""Quickstart: pretrained EfficientNet-Lite0 features and a logistic regression.

Runs offline: the ImageNet weights come with skt, the digits with scikit-learn.
"""

from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skt import FeatureExtractor
from skt.datasets import load_digits_images

digits = load_digits_images(size=64)  # 1,797 handwritten digits as uint8 (N, 64, 64) images
X_train, X_test, y_train, y_test = train_test_split(
    digits.images, digits.target, test_size=0.25, stratify=digits.target, random_state=0)

pipe = make_pipeline(
    FeatureExtractor(backbone="efficientnet_lite0", layers=None, pooling="avg", image_size=64),
    StandardScaler(),
    LogisticRegression(max_iter=2000),
)
pipe.fit(X_train, y_train)
print(f"{pipe[0].n_features_out_} features per image ({pipe[0].engine_} engine)")
print(f"test accuracy: {pipe.score(X_test, y_test):.3f}")
