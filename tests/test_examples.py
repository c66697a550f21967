"""Every script in examples/ runs offline and prints what it promises."""

import re
import subprocess
import sys
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
}


def test_every_example_is_listed():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(script):
    result = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    pattern, least = EXPECTED[script]
    match = re.search(pattern, result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) >= least, result.stdout
