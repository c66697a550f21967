"""The package's layering: every import between skt's modules follows an allowed arrow.

Data flows one way: images -> backbones -> extract -> the estimators, with
training beside them and the harness and command line on top. Leaves
(pooling, cache, datasets and the private helpers) know no stage. A module
may import its own package and the packages listed for it below, nothing
else of skt; the test reads every import with ``ast``, including those
inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "skt"

_CORE = {"skt._utils", "skt._version", "skt._sklearn"}
ALLOWED = {
    # leaves
    "skt._version": set(),
    "skt._sklearn": set(),
    "skt._utils": set(),
    "skt.pooling": set(),
    "skt.cache": {"skt._utils"},
    "skt.datasets": set(),
    # the flow
    "skt.images": {"skt._utils"},
    "skt.backbones": {"skt._utils", "skt.images"},
    "skt.extract": {"skt._utils", "skt.images", "skt.backbones", "skt.pooling", "skt.cache"},
    "skt.training": {"skt._utils", "skt.images", "skt.backbones"},
    # the estimators
    "skt._base": {"skt._sklearn"},
    "skt.extractor": _CORE | {"skt._base", "skt.images", "skt.backbones", "skt.extract",
                              "skt.pooling", "skt.cache"},
    "skt.finetune": _CORE | {"skt._base", "skt.images", "skt.backbones", "skt.extract",
                             "skt.pooling", "skt.cache", "skt.training", "skt.extractor"},
    # on top
    "skt.bench": _CORE | {"skt.images", "skt.backbones", "skt.extract", "skt.cache",
                          "skt.extractor", "skt.finetune", "skt.datasets"},
    "skt.cli": _CORE | {"skt", "skt.images", "skt.backbones", "skt.cache", "skt.extractor",
                        "skt.bench", "skt.distributed", "skt.transferability"},
    "skt.distributed": _CORE | {"skt.extractor"},
    "skt.da": _CORE,
    "skt.transferability": {"skt.extractor"},
    "skt.train": _CORE | {"skt", "skt.images", "skt.finetune", "skt.persist"},
    "skt.persist": _CORE | {"skt._base", "skt.images", "skt.backbones", "skt.pooling",
                            "skt.cache", "skt.extractor", "skt.finetune"},
    "skt.__main__": {"skt.cli"},
    "skt": {"skt._version", "skt.backbones", "skt.cache", "skt.extractor", "skt.finetune",
            "skt.images", "skt.persist", "skt.transferability"},
}
# Third-party modules some layers must never reach.
FORBIDDEN = {
    "skt.images": ("torchvision.models",),
    "skt.pooling": ("torchvision", "sklearn", "PIL"),
    "skt.cache": ("torchvision", "sklearn"),
    "skt._utils": ("torchvision", "sklearn", "numpy"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _imports(path: Path) -> list[tuple[int, str]]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            if base in ("skt", "skt.extract"):  # from skt import extractor: a module too
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names
                          if (ROOT.parent / base.replace(".", "/") / f"{alias.name}.py").exists()]
    return found


SOURCES = sorted(ROOT.rglob("*.py"))


def test_every_module_has_a_rule():
    layers = {_layer(_module_name(path)) for path in SOURCES}
    assert layers == set(ALLOWED), "add the new module's allowed arrows to ALLOWED"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_imports_follow_the_allowed_arrows(path):
    layer = _layer(_module_name(path))
    wrong = []
    for line, target in _imports(path):
        if target == "skt" or target.startswith("skt."):
            target_layer = target if target == "skt" else _layer(target)
            if target_layer != layer and target_layer not in ALLOWED[layer]:
                wrong.append(f"line {line}: {target}")
        elif any(target == bad or target.startswith(bad + ".")
                 for bad in FORBIDDEN.get(layer, ())):
            wrong.append(f"line {line}: {target} (forbidden for {layer})")
    assert not wrong, f"{path.name} ({layer}) points up the flow: {wrong}"


def test_the_rules_see_real_imports():
    # A rule set that nothing could break would make the test above pass vacuously.
    targets = {target for path in SOURCES for _, target in _imports(path)}
    assert {"skt.images", "skt.backbones", "skt.extract", "skt.cache", "skt.training"} <= targets
    extract = [t for path in (ROOT / "extract").glob("*.py") for _, t in _imports(path)]
    assert "skt.pooling" in extract and "skt.backbones" in extract


def test_import_skt_loads_neither_torch_nor_the_harness():
    code = """
import sys
import skt
heavy = ("torch", "sklearn", "matplotlib", "skt.bench", "skt.extractor")
print(sorted(m for m in heavy if m in sys.modules))
skt.FeatureExtractor, skt.FineTuneClassifier
print("skt.extractor" in sys.modules, "skt.bench" in sys.modules)
print(sorted(m for m in ("skada", "skorch", "dask", "distributed", "timm") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    # the optional extras (skt[da], skt[dask], skt[timm]) load only when their modules are used
    assert result.stdout.split("\n")[:3] == ["[]", "True False", "[]"]
