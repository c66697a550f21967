"""A folder of class subfolders -> features -> SVC, scored by cross-validation.

The folder is built here from 160 solar-cell images of the ELPV dataset
(``root/defective/*.png`` and ``root/working/*.png``); point ``root`` at your
own folder instead. ``FeatureExtractor`` learns nothing from the images, so
the features are computed once, before cross-validating the head.
"""

import shutil
import tempfile
from pathlib import Path

import numpy as np
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from skt import FeatureExtractor, load_image_folder
from skt.datasets import load_elpv

root = Path(tempfile.mkdtemp()) / "cells"
cells = load_elpv(return_paths=True)
rng = np.random.default_rng(0)
for label, name in ((1, "defective"), (0, "working")):
    (root / name).mkdir(parents=True)
    for i in rng.choice(np.flatnonzero(cells.target == label), 80, replace=False):
        shutil.copy(cells.images[i], root / name)

paths, labels = load_image_folder(root)  # sorted paths, and each one's subfolder name
print(f"{len(paths)} images, classes {sorted(set(labels))}")

features = FeatureExtractor(image_size=128).fit_transform(paths)
scores = cross_val_score(make_pipeline(StandardScaler(), SVC()), features, labels, cv=4)
print(f"4-fold accuracy: {scores.mean():.3f} +/- {scores.std():.3f}")
shutil.rmtree(root.parent)
