"""The same grid search on a Dask cluster and in this process: same best_params_.

scikit-learn's own route: GridSearchCV under joblib's "dask" backend sends
each (candidate, fold) fit to a worker. A fitted FeatureExtractor travels
without its weights (workers rebuild the network by name, once per
process), and the feature cache, a folder every worker shares, holds each
image's features once: workers computing the same images wait for each
other under the cache's lock instead of running the network twice. Here the
cluster is a LocalCluster of two worker processes; a real one is
``Client("tcp://scheduler:8786")`` with the cache on a shared file system.
"""

import tempfile
import time

import joblib
from distributed import Client, LocalCluster
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skt import FeatureExtractor
from skt.datasets import load_elpv, subsample


def search(X, y, cache: str, n_jobs=None) -> GridSearchCV:
    pipe = make_pipeline(
        FeatureExtractor(layers="blocks.12", image_size=128, cache=cache),
        StandardScaler(),
        LogisticRegression(max_iter=3000),
    )
    grid = {
        "featureextractor__pooling": ["avg", "gem"],
        "logisticregression__C": [0.01, 0.1, 1.0],
    }
    return GridSearchCV(pipe, grid, cv=3, scoring="balanced_accuracy", n_jobs=n_jobs).fit(X, y)


if __name__ == "__main__":  # worker processes start by importing this file's caller
    cells = subsample(load_elpv(return_paths=True), 200, random_state=0)
    X_train, X_test, y_train, y_test = train_test_split(
        cells.images, cells.target, test_size=0.25, stratify=cells.target, random_state=0)
    cache = tempfile.mkdtemp()  # on a real cluster: a folder every worker can write

    with (LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
          Client(cluster)):
        start = time.perf_counter()
        with joblib.parallel_backend("dask"):
            on_cluster = search(X_train, y_train, cache, n_jobs=-1)
        seconds = time.perf_counter() - start
        print(f"on the cluster: {seconds:.1f} s, best {on_cluster.best_params_}")

    start = time.perf_counter()
    here = search(X_train, y_train, cache)  # warm cache: no image goes through the network
    print(f"in this process: {time.perf_counter() - start:.1f} s, best {here.best_params_}")
    same = on_cluster.best_params_ == here.best_params_
    print(f"same best_params_ on the cluster and here: {same}")
    print(f"held-out balanced accuracy: {on_cluster.score(X_test, y_test):.3f}")
