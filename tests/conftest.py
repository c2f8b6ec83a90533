"""Shared fixtures. Tests run on the CPU with however many devices JAX sees (1 by default)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _fashion_mnist_dir() -> Path:
    # CI points FASHION_MNIST_DIR at the shared copy; locally it lies beside the checkout.
    env = os.environ.get("FASHION_MNIST_DIR")
    # Absolute: tests symlink to it from elsewhere.
    return Path(env).resolve() if env else REPO.parent / "shared" / "data" / "fashion_mnist"


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The folder with the four original Fashion-MNIST IDX .gz files (real data)."""
    path = _fashion_mnist_dir()
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI") or os.environ.get("FASHION_MNIST_DIR"):  # asked for: a failure
            pytest.fail(f"real Fashion-MNIST not found at {path} (set FASHION_MNIST_DIR)")
        pytest.skip(f"real Fashion-MNIST not found at {path} (set FASHION_MNIST_DIR)")
    return path


TRAIN = REPO / "scripts" / "train.py"
# A tiny configuration on the real data: 8 steps per epoch, seconds per epoch on 2 CPU cores.
TINY = ["--image_size=16", "--stem=small", "--width=4", "--batch_size=32",
        "--train_examples=256", "--steps_per_dispatch=1"]


@pytest.fixture(scope="session")
def run_train(fashion_mnist_dir):
    """Runs scripts/train.py in a subprocess (on the real data) and returns the CompletedProcess."""
    import subprocess
    import sys

    def run(*args: str, timeout: float = 600, env: dict | None = None):
        cmd = [sys.executable, str(TRAIN), f"--data_dir={fashion_mnist_dir}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})

    return run
