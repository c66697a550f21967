"""SVM, logistic regression and LDA on the same cached Lite0 features.

The first head pays for the forward passes; with ``cache=`` the other two read
the features from disk, and so does a second run of this script.
"""

import tempfile
import time

from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from skt import FeatureExtractor, cache_info
from skt.datasets import load_elpv, subsample

cells = subsample(load_elpv(return_paths=True), 300, random_state=0)
cache = tempfile.mkdtemp(prefix="skt-cache-")
heads = {
    "SVC (RBF)": SVC(),
    "LogisticRegression": LogisticRegression(max_iter=2000),
    "LinearDiscriminantAnalysis": LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto"),
}
for name, head in heads.items():
    start = time.perf_counter()
    pipe = make_pipeline(FeatureExtractor(image_size=128, cache=cache), StandardScaler(), head)
    scores = cross_val_score(pipe, cells.images, cells.target, cv=5, scoring="balanced_accuracy")
    print(f"{name:28s} balanced accuracy {scores.mean():.3f} +/- {scores.std():.3f}   "
          f"{time.perf_counter() - start:5.1f} s")
info = cache_info(cache)
print(f"cache: {info['entries']} entries, {info['bytes'] / 1e6:.1f} MB in {cache}")
