"""Every script in examples/ runs offline and prints what it promises.

The scripts run in this process (``runpy``, as ``__main__``), not in a new
interpreter each: torch, scikit-learn and the weights then load once for
all of them, which takes a quarter off this file's time.
"""

import re
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"

# What each script must print: a pattern with one number, and the least that number may be.
EXPECTED = {
    "quickstart.py": (r"test accuracy: ([\d.]+)", 0.90),
    "grid_search.py": (r"held-out balanced accuracy: ([\d.]+)", 0.60),
    "fine_tune.py": (r"FineTuneClassifier \(4 epochs\)\s+accuracy ([\d.]+)", 0.75),
    "image_folder.py": (r"4-fold accuracy: ([\d.]+)", 0.55),
    "custom_backbone.py": (r"test accuracy ([\d.]+)", 0.85),
    "compare_heads.py": (r"SVC \(RBF\)\s+balanced accuracy ([\d.]+)", 0.55),
    "distributed_search.py": (r"held-out balanced accuracy: ([\d.]+)", 0.60),
}

# Lines a script must print as they are.
LINES = {
    "distributed_search.py": "same best_params_ on the cluster and here: True",
}


def test_every_example_is_listed():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


# Rows that must beat another row of the same output by a margin.
BEATS = {
    "fine_tune.py": (r"FineTuneClassifier \(4 epochs\)\s+accuracy ([\d.]+)",
                     r"raw pixels \(32x32\) \+ LogisticRegression\s+accuracy ([\d.]+)", 0.03),
}


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, text
    return float(match.group(1))


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(script, capsys):
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    stdout = capsys.readouterr().out
    pattern, least = EXPECTED[script]
    assert _number(pattern, stdout) >= least, stdout
    if script in LINES:
        assert LINES[script] in stdout.splitlines(), stdout
    if script in BEATS:
        better, worse, margin = BEATS[script]
        assert _number(better, stdout) > _number(worse, stdout) + margin, stdout
