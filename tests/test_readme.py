"""The README's Python example runs as printed, in a fresh interpreter, and does what it says."""

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, UNOPTIMISED

pytestmark = pytest.mark.slow  # a full-size ResNet-18 step at 96x96: ~15 s on 2 cores


def readme_python_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_api_example_runs_as_printed():
    checks = """
import math
assert "resnet18" in resnet_jax.list_models() and "resnext50_32x4d" in resnet_jax.list_models()
assert int(state.step) == 1 and math.isfinite(float(metrics["loss"]))
assert logits.shape == (32, 10)
assert float(sums["count"]) == 32, sums.keys()
print("checked")
"""
    out = subprocess.run([sys.executable, "-c", readme_python_example() + checks],
                         capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **UNOPTIMISED})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("checked")
