"""Shared fixtures. Tests run on the CPU with however many devices JAX sees (1 by default)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _places() -> list[Path]:
    """Where the real Fashion-MNIST's IDX files are looked for: FASHION_MNIST_DIR alone if set,
    else where the trainer looks untold (TFDS's data dir, whose downloads/manual/ holds the
    original files, then Debian's package dataset-fashion-mnist), then ../shared/data beside
    the checkout."""
    env = os.environ.get("FASHION_MNIST_DIR")
    if env:
        return [Path(env)]
    tfds = Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()
    debian = Path("/usr/share/datasets/fashion-mnist")  # as resnet_jax.data's table says
    return [tfds / "downloads" / "manual", debian, REPO.parent / "shared" / "data" /
            "fashion_mnist"]


def _fashion_mnist_dir() -> Path | None:
    # Absolute: tests symlink to it from elsewhere.
    return next((p.resolve() for p in _places() if (p / "train-images-idx3-ubyte.gz").is_file()),
                None)


def _not_found() -> str:
    return f"real Fashion-MNIST not found in {', '.join(map(str, _places()))}"


def pytest_terminal_summary(terminalreporter) -> None:
    """One line (also under -q) when tests were skipped for want of the real data."""
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if _not_found() in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(
            f"{_not_found()}: {len(skipped)} tests on it skipped (apt-get install "
            "dataset-fashion-mnist, or set FASHION_MNIST_DIR)")


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The folder with the four original Fashion-MNIST IDX .gz files (real data)."""
    path = _fashion_mnist_dir()
    if path is None:
        if os.environ.get("CI") or os.environ.get("FASHION_MNIST_DIR"):  # asked for: a failure
            pytest.fail(f"{_not_found()} (set FASHION_MNIST_DIR)")
        pytest.skip(_not_found())
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
