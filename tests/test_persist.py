"""skt.save / skt.load: fitted models in one file, without pickle, and no code run on load."""

from __future__ import annotations

import ast
import importlib
import io
import json
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import skops.io
import torch
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from torchvision.models import ResNet18_Weights

import skt
import skt.extractor
from skt.finetune import FineTuneClassifier
from skt.images import Preprocessing
from skt.persist import FORMAT_VERSION, TRUSTED_TYPES, _decode, _encode
from skt.pooling import LayerLayout
from skt.training import Callback

from .conftest import TINY
from .test_finetune import make_clf, make_images, tiny_net

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fresh_process():
    """Forget the networks this process resolved, as a new process would not have them."""
    skt.extractor._RUNTIMES.clear()
    skt.extractor._BACKBONES.clear()


def round_trip(model, tmp_path, **load_options):
    path = tmp_path / "model.skt"
    skt.save(model, path)
    fresh_process()
    return skt.load(path, **load_options)


def members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def rewrite(path, name: str, data: bytes) -> None:
    """Replace member ``name`` of an archive."""
    content = {**members(path), name: data}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in content.items():
            archive.writestr(name, data)


def manifest(path) -> dict:
    return json.loads(members(path)["skt.json"])


def with_manifest(path, change) -> None:
    content = manifest(path)
    change(content)
    rewrite(path, "skt.json", json.dumps(content).encode())


@pytest.fixture(scope="module")
def labelled():
    """16 images of 32 px in two classes, as FineTuneClassifier's docstring makes them."""
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    X[8:, :, :16] = 255
    return X, np.array(["a"] * 8 + ["b"] * 8)


@pytest.fixture(scope="module")
def fine_tuned(labelled):
    X, y = labelled
    return FineTuneClassifier("resnet18", weights=None, image_size=32, max_iter=1, batch_size=8,
                              learning_rate_init=1e-2, device="cpu", random_state=0).fit(X, y)


@pytest.fixture(scope="module")
def pipeline(labelled):
    X, y = labelled
    return Pipeline([("features", skt.FeatureExtractor(**TINY)), ("scale", StandardScaler()),
                     ("head", LogisticRegression())]).fit(X, y)


# ------------------------------------------------------------- round trips --

def test_an_extractor_with_seeded_weights_stores_their_hash_and_rebuilds_them(images, tmp_path):
    extractor = skt.FeatureExtractor(**TINY).fit(images)
    expected = extractor.transform(images)
    loaded = round_trip(extractor, tmp_path)
    assert list(members(tmp_path / "model.skt")) == ["skt.json"]  # no weights in the file
    assert loaded.model_ is not None  # rebuilt at load, not at first use
    assert loaded is not extractor and loaded.get_params() == extractor.get_params()
    assert loaded._fingerprint == extractor._fingerprint
    assert np.array_equal(loaded.transform(images), expected)
    assert loaded.get_feature_names_out().tolist() == extractor.get_feature_names_out().tolist()


def test_the_bundled_pretrained_lite0_is_rebuilt_by_name(images, tmp_path):
    extractor = skt.FeatureExtractor("efficientnet_lite0", image_size=64, engine="torch")
    expected = extractor.fit(images).transform(images)
    loaded = round_trip(extractor, tmp_path)
    assert list(members(tmp_path / "model.skt")) == ["skt.json"]
    assert loaded.weights_ == "efficientnet_lite0.IMAGENET1K_V1"
    assert np.array_equal(loaded.transform(images), expected)


def test_weights_that_a_name_cannot_rebuild_are_stored(images, tmp_path):
    extractor = skt.FeatureExtractor(**{**TINY, "random_state": None}).fit(images)
    expected = extractor.transform(images)
    loaded = round_trip(extractor, tmp_path)
    assert "estimators/0.safetensors" in members(tmp_path / "model.skt")
    assert np.array_equal(loaded.transform(images), expected)


def test_a_rebuilt_network_with_other_weights_is_refused(images, tmp_path):
    skt.save(skt.FeatureExtractor(**TINY).fit(images), tmp_path / "model.skt")

    def other_hash(content):
        content["estimators"][0]["attributes"]["_fingerprint"] = "0" * 32

    with_manifest(tmp_path / "model.skt", other_hash)
    with pytest.raises(RuntimeError, match="rebuilt on this machine differ .* refit it"):
        skt.load(tmp_path / "model.skt")


def test_a_fine_tuned_classifier_round_trips(fine_tuned, labelled, tmp_path):
    X, _ = labelled
    proba, features = fine_tuned.predict_proba(X), fine_tuned.transform(X)
    loaded = round_trip(fine_tuned, tmp_path)
    assert np.array_equal(loaded.predict_proba(X), proba)
    assert np.array_equal(loaded.transform(X), features)
    assert loaded.predict(X).tolist() == fine_tuned.predict(X).tolist()
    assert loaded.classes_.tolist() == ["a", "b"] and loaded.classes_.dtype == np.dtype("<U1")
    assert loaded.history_ == fine_tuned.history_ and loaded.n_iter_ == 1
    assert loaded.preprocessing_ == fine_tuned.preprocessing_
    assert loaded.get_params() == fine_tuned.get_params()
    assert not loaded.model_.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.model_.state_dict().values(),
                                                  fine_tuned.model_.state_dict().values(),
                                                  strict=True))


def test_a_pipeline_round_trips_and_is_not_changed_by_saving(pipeline, labelled, tmp_path):
    X, _ = labelled
    extractor = pipeline.named_steps["features"]
    loaded = round_trip(pipeline, tmp_path)
    assert pipeline.steps[0][1] is extractor and extractor.model_ is not None
    assert [name for name, _ in loaded.steps] == ["features", "scale", "head"]
    assert isinstance(loaded.named_steps["features"], skt.FeatureExtractor)
    assert np.array_equal(loaded.predict_proba(X), pipeline.predict_proba(X))
    assert set(members(tmp_path / "model.skt")) == {"skt.json", "tree.skops"}


def test_a_grid_search_and_its_best_estimator_round_trip(pipeline, labelled, tmp_path):
    X, y = labelled
    search = GridSearchCV(pipeline, {"head__C": [0.01, 1.0]}, cv=2).fit(X, y)
    best = round_trip(search.best_estimator_, tmp_path)
    assert np.array_equal(best.predict_proba(X), search.predict_proba(X))
    whole = round_trip(search, tmp_path)  # splitter and scorer are on the trusted list
    assert whole.best_params_ == search.best_params_
    assert isinstance(whole.estimator.steps[0][1], skt.FeatureExtractor)
    assert np.array_equal(whole.predict_proba(X), search.predict_proba(X))


def test_extractors_inside_fitted_helper_objects_round_trip(pipeline, labelled, tmp_path):
    # CalibratedClassifierCV keeps its fitted pipelines in plain objects, not estimators.
    X, y = labelled
    model = CalibratedClassifierCV(clone(pipeline), cv=2).fit(X, y)
    loaded = round_trip(model, tmp_path)
    assert len(manifest(tmp_path / "model.skt")["estimators"]) == 3  # the template and 2 fits
    assert np.array_equal(loaded.predict_proba(X), model.predict_proba(X))


def test_a_user_module_comes_back_only_through_modules(images, tmp_path):
    extractor = skt.FeatureExtractor(tiny_net(), weights=None, image_size=16,
                                     engine="torch").fit(images)
    expected = extractor.transform(images)
    path = tmp_path / "model.skt"
    skt.save(extractor, path)
    with pytest.raises(ValueError, match=r"user module of class 'Sequential'.* "
                                         r"modules=\{'Sequential': <module>\}"):
        skt.load(path)
    with pytest.raises(ValueError, match="saved weights of backbone do not fit"):
        skt.load(path, modules={"Sequential": tiny_net(outputs=3)})
    fresh_process()
    loaded = skt.load(path, modules={"Sequential": tiny_net(seed=1)})  # weights are replaced
    assert np.array_equal(loaded.transform(images), expected)
    assert all(torch.equal(a, b) for a, b in zip(loaded.backbone.state_dict().values(),
                                                  tiny_net().state_dict().values(), strict=True))
    # The backbone and the extractor's network hold the same weights: stored once.
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo("estimators/0.safetensors").file_size < 10_000


def test_a_fine_tuned_user_module_with_tagged_parameters(tmp_path):
    X, y = make_images(16)
    clf = make_clf(max_iter=1, class_weight={"a": 1.0, "b": 2.0}, mean=(0.5, 0.5, 0.5),
                   std=np.array([0.25, 0.25, 0.25]), device=torch.device("cpu"),
                   random_state=np.random.RandomState(0)).fit(X, y)
    loaded = round_trip(clf, tmp_path, modules={"Sequential": tiny_net()})
    assert np.array_equal(loaded.predict_proba(X), clf.predict_proba(X))
    assert loaded.class_weight == {"a": 1.0, "b": 2.0} and loaded.mean == (0.5, 0.5, 0.5)
    assert loaded.std.tolist() == [0.25] * 3 and loaded.device == torch.device("cpu")
    assert loaded.random_state.randint(1000) == clf.random_state.randint(1000)


def test_parameters_that_are_code_are_refused_at_save(tmp_path):
    clf = FineTuneClassifier(callbacks=[Callback()])
    with pytest.raises(TypeError, match=r"FineTuneClassifier parameter 'callbacks'\[0\] is a "
                                        r"skt.training._callbacks.Callback.*set_params"):
        skt.save(clf, tmp_path / "model.skt")
    assert not (tmp_path / "model.skt").exists()


def test_subclasses_of_skt_estimators_are_refused_at_save(tmp_path):
    class Custom(skt.FeatureExtractor):
        pass

    with pytest.raises(TypeError, match="stores skt's own estimators .* not .*Custom"):
        skt.save(Custom(), tmp_path / "model.skt")


def test_json_values_and_their_tags_round_trip():
    values = [None, True, 3, 2.5, float("nan"), "text", [1, (2, 3)], {"a": 1},
              {1: "one", "$x": 2}, np.array([[1, 2]], dtype=np.int16),
              np.array([0.1, np.inf], dtype=np.float32), np.array(["a", "bc"]),
              np.array(["a", 1], dtype=object), np.float32(0.1), np.int64(7), np.bool_(True),
              Path("a/b"), torch.device("cpu"), ResNet18_Weights.IMAGENET1K_V1,
              Preprocessing(crop_size=32), LayerLayout("pre_logits", "vector", 512)]
    for value in values:
        encoded = json.loads(json.dumps(_encode(value, "value")))
        decoded = _decode(encoded)
        assert type(decoded) is type(value)
        if isinstance(value, np.ndarray):
            assert decoded.dtype == value.dtype and decoded.shape == value.shape
            assert decoded.tolist() == value.tolist()
        elif value == value:  # not NaN
            assert decoded == value
    state = np.random.RandomState(3)
    assert _decode(_encode(state, "state")).randint(10**6) == state.randint(10**6)
    with pytest.raises(TypeError, match="^thing is a builtins.function, which skt.save cannot"):
        _encode(lambda: None, "thing")
    with pytest.raises(ValueError, match="unknown tagged value"):
        _decode({"$pickle": "..."})


# ------------------------------------------------- crafted and foreign files --

class Evil:
    """Would run code when built: its __setstate__ writes the file it was given."""

    def __init__(self, path):
        self.path = str(path)

    def __setstate__(self, state):
        Path(state["path"]).touch()


class Doubler(TransformerMixin, BaseEstimator):
    """A harmless transformer from outside scikit-learn."""

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return np.asarray(X) * 2


def skt_file_with_tree(path, tree: bytes) -> None:
    content = {"format": "skt", "version": FORMAT_VERSION, "root": {"skops": "tree.skops"},
               "estimators": []}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("skt.json", json.dumps(content))
        archive.writestr("tree.skops", tree)


def eval_tree(code: str) -> bytes:
    """A skops file whose loading calls ``builtins.eval(code)``."""
    with zipfile.ZipFile(io.BytesIO(skops.io.dumps((code,)))) as archive:
        arguments = json.loads(archive.read("schema.json"))
    schema = {"__class__": "eval", "__module__": "builtins",
              "__loader__": "ConstructorFromReduceNode", "__id__": 1,
              "content": {key: value for key, value in arguments.items()
                          if key not in ("protocol", "_skops_version")},
              "protocol": arguments["protocol"], "_skops_version": arguments["_skops_version"]}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("schema.json", json.dumps(schema))
    return buffer.getvalue()


def test_a_tree_that_would_call_eval_is_refused_before_anything_runs(tmp_path):
    sentinel = tmp_path / "sentinel"
    tree = eval_tree(f"open({str(sentinel)!r}, 'w').close()")
    skt_file_with_tree(tmp_path / "model.skt", tree)
    with pytest.raises(ValueError, match=r"holds types that are not trusted: \['builtins.eval'\]"):
        skt.load(tmp_path / "model.skt")
    assert not sentinel.exists()
    with pytest.raises(ValueError, match="builtins.eval"):
        skt.load(tmp_path / "model.skt", trusted=["sklearn.tree._tree.Tree"])
    assert not sentinel.exists()
    skops.io.loads(tree, trusted=["builtins.eval"])  # the payload is live, once trusted
    assert sentinel.exists()


def test_a_tree_with_a_custom_class_or_os_system_is_refused(tmp_path):
    sentinel = tmp_path / "sentinel"
    tree = skops.io.dumps([Evil(sentinel), os.system])
    skt_file_with_tree(tmp_path / "model.skt", tree)
    names = sorted(["tests.test_persist.Evil", f"{os.system.__module__}.system"])
    with pytest.raises(ValueError, match=re.escape(f"not trusted: {names}. Nothing was loaded")):
        skt.load(tmp_path / "model.skt")
    assert not sentinel.exists()
    skops.io.loads(tree, trusted=names)  # the custom class runs its code, once trusted
    assert sentinel.exists()


def test_types_off_the_list_warn_at_save_and_load_only_when_trusted(labelled, tmp_path):
    X, y = labelled
    model = Pipeline([("features", skt.FeatureExtractor(**TINY)), ("double", Doubler()),
                      ("head", LogisticRegression())]).fit(X, y)
    path = tmp_path / "model.skt"
    with pytest.warns(UserWarning, match=r"trusted=\['tests.test_persist.Doubler'\]"):
        skt.save(model, path)
    with pytest.raises(ValueError, match=r"not trusted: \['tests.test_persist.Doubler'\]"):
        skt.load(path)
    loaded = skt.load(path, trusted=["tests.test_persist.Doubler"])
    assert np.array_equal(loaded.predict_proba(X), model.predict_proba(X))
    with pytest.raises(TypeError, match="pass a list of type names"):
        skt.load(path, trusted=True)


def test_pickle_and_joblib_files_are_not_opened(tmp_path):
    import joblib

    sentinel = tmp_path / "sentinel"

    class Payload:
        def __reduce__(self):
            return open, (str(sentinel), "w")

    data = pickle.dumps(Payload())
    (tmp_path / "model.pkl").write_bytes(data)
    joblib.dump(LogisticRegression(), tmp_path / "model.joblib")
    for name in ("model.pkl", "model.joblib"):
        with pytest.raises(ValueError, match=rf"{name} is not an skt file: .* joblib.load only "
                                             "if it comes from a source you trust"):
            skt.load(tmp_path / name)
    assert not sentinel.exists()
    pickle.loads(data).close()  # the payload is live when unpickled
    assert sentinel.exists()


def test_other_zip_files_and_versions_are_named(fine_tuned, tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")  # a zip archive too
    with pytest.raises(ValueError, match="a zip archive but not an skt file: it has no skt.json"):
        skt.load(tmp_path / "weights.pt")
    path = tmp_path / "model.skt"
    skt.save(fine_tuned, path)
    with_manifest(path, lambda content: content.update(version=FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match=rf"format version {FORMAT_VERSION + 1}; skt .* reads "
                                         rf"version {FORMAT_VERSION}\. Load it with the skt"):
        skt.load(path)
    with_manifest(path, lambda content: content.update(version=FORMAT_VERSION, format="other"))
    with pytest.raises(ValueError, match='is not an skt file: skt.json does not say "format"'):
        skt.load(path)
    with pytest.raises(FileNotFoundError, match="missing.skt: no such file"):
        skt.load(tmp_path / "missing.skt")


@pytest.mark.parametrize(("change", "message"), [
    (lambda e: e["params"].update(colour="red"),
     r"unknown FineTuneClassifier parameters \['colour'\]"),
    (lambda e: e["attributes"].update(predict="x"),
     "'predict' is not a fitted attribute a FineTuneClassifier can have"),
    (lambda e: e["attributes"].update(max_iter=3),
     "'max_iter' is not a fitted attribute"),
    (lambda e: e.update({"class": "builtins.eval"}),
     "unknown estimator class 'builtins.eval'; skt.load builds FeatureExtractor"),
    (lambda e: e.update(code="print(1)"), "an entry needs exactly a 'class'"),
    (lambda e: e["attributes"].update(classes_={"$pickle": "gASV"}),
     r"'classes_' holds an invalid value \(unknown tagged value \['\$pickle'\]\)"),
])
def test_unknown_keys_and_values_in_the_json_are_refused(fine_tuned, tmp_path, change, message):
    path = tmp_path / "model.skt"
    skt.save(fine_tuned, path)
    with_manifest(path, lambda content: change(content["estimators"][0]))
    with pytest.raises(ValueError, match=rf"model.skt: skt estimator 0: {message}"):
        skt.load(path)


def test_weights_of_the_wrong_shape_or_value_are_refused(fine_tuned, tmp_path):
    from safetensors.torch import load, save

    path = tmp_path / "model.skt"
    skt.save(fine_tuned, path)
    tensors = load(members(path)["estimators/0.safetensors"])
    rewrite(path, "estimators/0.safetensors",
            save({**tensors, "model_.fc.weight": torch.zeros(2, 7)}))
    with pytest.raises(ValueError, match=r"(?s)the saved weights of model_ do not fit the ResNet "
                                         r"built from its parameters: .*size mismatch for "
                                         r"fc.weight"):
        skt.load(path)
    rewrite(path, "estimators/0.safetensors",
            save({**tensors, "model_.fc.bias": tensors["model_.fc.bias"] + 1}))
    with pytest.raises(ValueError, match="weights of model_ differ from those that were saved"):
        skt.load(path)
    rewrite(path, "estimators/0.safetensors", b"not tensors")
    with pytest.raises(ValueError, match="estimators/0.safetensors is not a readable "
                                         "safetensors file"):
        skt.load(path)


def test_a_placeholder_for_a_missing_estimator_is_refused(pipeline, tmp_path):
    path = tmp_path / "model.skt"
    skt.save(pipeline, path)
    with_manifest(path, lambda content: content.update(estimators=[]))
    with pytest.raises(ValueError, match="refers to skt estimator 0, which is not among the 0"):
        skt.load(path)


# ----------------------------------------------------------------- install --

def test_the_trusted_types_exist_in_scikit_learn():
    for name in TRUSTED_TYPES:
        module, _, attribute = name.rpartition(".")
        value = getattr(importlib.import_module(module), attribute)
        assert value.__module__ == module, name  # defined there, not imported from elsewhere
        assert isinstance(value, type) or module.startswith("sklearn.metrics._"), name


def test_a_missing_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "skops.io", None)
    with pytest.raises(ImportError, match=r'pip install "skt\[safe\]"'):
        skt.save(LogisticRegression(), tmp_path / "model.skt")


def test_skt_imports_skops_and_safetensors_only_inside_functions():
    # So that `import skt` and skt.persist itself work without the safe extra.
    inside, found = set(), []
    for path in Path(skt.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                inside.update(id(child) for child in ast.walk(node))
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                           else [alias.name for alias in node.names])
                if any(name.split(".")[0] in ("skops", "safetensors") for name in modules):
                    found.append((path.name, node))
    assert sorted(name for name, _ in found) == ["_resolve.py", *["persist.py"] * 3]
    assert all(id(node) in inside for _, node in found)


def test_skops_releases_that_can_run_code_are_refused(monkeypatch):
    import skops

    monkeypatch.setattr(skops, "__version__", "0.11.0")
    with pytest.raises(ImportError, match=r"skops 0\.11\.0 is too old for skt\.load: releases "
                                          r"before 0\.12 can be made to run code"):
        skt.persist._safe_packages()


def test_a_false_weights_hash_is_refused(images, tmp_path):
    # The hash keys shared runtimes and feature caches: believing a false one would let a
    # crafted file fill a cache with another network's features.
    skt.save(skt.FeatureExtractor(**{**TINY, "random_state": None}).fit(images),
             tmp_path / "model.skt")
    with_manifest(tmp_path / "model.skt", lambda content: content["estimators"][0][
        "attributes"].update(_fingerprint="0" * 32))
    with pytest.raises(ValueError, match="skt estimator 0: the weights' hash recorded in the "
                                         "file is not the hash of its weights"):
        skt.load(tmp_path / "model.skt")


def test_a_string_array_wider_than_its_strings_is_refused(fine_tuned, tmp_path):
    skt.save(fine_tuned, tmp_path / "model.skt")  # classes_ is ["a", "b"]

    def widen(content):
        classes = content["estimators"][0]["attributes"]["classes_"]["$ndarray"]
        classes["dtype"] = "<U100000000"

    with_manifest(tmp_path / "model.skt", widen)
    with pytest.raises(ValueError, match=r"an array of dtype <U100000000 holds strings of at "
                                         r"most 1 characters"):
        skt.load(tmp_path / "model.skt")


def test_a_folder_is_not_a_model_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder; pass the path of a file"):
        skt.load(tmp_path)
