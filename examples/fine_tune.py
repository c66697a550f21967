"""Fine-tune EfficientNet-Lite0 on solar-cell images, against frozen features and raw pixels.

480 ELPV cells (defective or working), half for training. The fine-tuned
network's penultimate features then feed an SVC, as any transformer would.
"""

import time

from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from skt import FeatureExtractor, FineTuneClassifier
from skt.bench import downsample
from skt.datasets import load_elpv, subsample

cells = subsample(load_elpv(return_paths=True), 480, random_state=0)
X_train, X_test, y_train, y_test = train_test_split(
    cells.images, cells.target, test_size=0.5, stratify=cells.target, random_state=0)

pixels = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000))
pixels.fit(downsample(X_train, size=32), y_train)
print(f"{'raw pixels (32x32) + LogisticRegression':38s} accuracy "
      f"{pixels.score(downsample(X_test, size=32), y_test):.3f}")

frozen = make_pipeline(FeatureExtractor(image_size=96), StandardScaler(),
                       LogisticRegression(max_iter=2000))
tuned = FineTuneClassifier(image_size=96, freeze=3, max_iter=4, augment="flip", verbose=1,
                           random_state=0)
for name, model in (("frozen features + LogisticRegression", frozen),
                    ("FineTuneClassifier (4 epochs)", tuned)):
    start = time.perf_counter()
    model.fit(X_train, y_train)
    print(f"{name:38s} accuracy {model.score(X_test, y_test):.3f}   "
          f"fit {time.perf_counter() - start:.0f} s")

print(f"training loss per epoch: {[round(loss, 3) for loss in tuned.loss_curve_]}")
svc = make_pipeline(StandardScaler(), SVC()).fit(tuned.transform(X_train), y_train)
accuracy = svc.score(tuned.transform(X_test), y_test)
print(f"{'fine-tuned features + SVC':38s} accuracy {accuracy:.3f}")
