"""Shared fixtures. Tests run on the CPU with however many devices JAX sees (1 by default)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _fashion_mnist_dir() -> Path:
    # CI points FASHION_MNIST_DIR at the shared copy; locally it lies beside the checkout.
    env = os.environ.get("FASHION_MNIST_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "fashion_mnist"


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The folder with the four original Fashion-MNIST IDX .gz files (real data)."""
    path = _fashion_mnist_dir()
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"real Fashion-MNIST not found at {path} (set FASHION_MNIST_DIR)")
        pytest.skip(f"real Fashion-MNIST not found at {path} (set FASHION_MNIST_DIR)")
    return path
