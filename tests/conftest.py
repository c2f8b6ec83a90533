"""Shared fixtures. Tests run on the CPU with however many devices JAX sees (1 by default)."""

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Compiling, not running, is most of the suite's time on 2 CPU cores, and many programs are
# compiled again and again: a run, then its resume in a new process; the same tiny model in
# many tests. One persistent compilation cache for the session (an empty folder, unless
# JAX_COMPILATION_CACHE_DIR names one, as .ci/run does to keep it between CI runs), which the
# trainer's subprocesses (and pytest-xdist's workers, started after this) inherit; a folder
# made here is removed at the end by the process that made it.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="resnet_jax_tests_xla_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The trainer's subprocesses compile with LLVM at -O1 instead of XLA:CPU's default -O2: a tiny
# run took 10-12 s against 12-15 s, and a ResNet-18 step at 28x28, batch 128, ran as fast
# (983 and 827 img/s against 968 and 865). The same function to float32 rounding (a tiny run's
# loss moved in its 7th digit after 16 steps); every comparison in the suite is within it.
#
# And without XLA:CPU's YNNPACK fusions (its matmul library, on by default): loading a cached
# program that has them is slow (XLA looks each fusion's instructions up one by one, and the
# time grows with the program's size), and most of the subprocesses' programs come from the
# cache. A tiny ResNet-152's train step loaded in 17 s with them and 5 s without; the
# experiments' degradation and depth took 206 s against 111 s. Not in this process (set
# below, after its CPU client has read the flags): with most optimisations off, a program
# without them sums in another order, and the two-step comparison of 1 and 8 devices moved by
# 1.6e-3 where every other pairing agreed to 5e-7. One test runs the trainer with XLA's own
# flags (DEFAULT_XLA_FLAGS), as a user does.
_O1, _NO_YNN = "--xla_backend_optimization_level=1", "--xla_cpu_experimental_ynn_fusion_type="
SUITE_XLA_FLAGS = f"{_O1} {_NO_YNN}"
DEFAULT_XLA_FLAGS = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                             if f not in (_O1, _NO_YNN))  # (a worker inherits the suite's)
os.environ["XLA_FLAGS"] = f"{DEFAULT_XLA_FLAGS} {_O1}".strip()


def xla_flags(devices: int) -> str:
    """The suite's XLA_FLAGS for a subprocess with `devices` fake CPU devices (the caller's own
    XLA_FLAGS left out)."""
    return f"{SUITE_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"


import jax  # noqa: E402 (after the cache's variables, which JAX reads once)

# The tests in this process compile a program and run it a few times: XLA's LLVM optimisation
# costs more than it saves there (a chunked-loop test took 86 s with it, 30 s without), as in
# Flax's own tests. It computes the same function to float32 rounding (not always to the bit),
# and only in this process.
jax.config.update("jax_disable_most_optimizations", True)
# The same for the tests' own worker processes (8 fake devices, the README's example): a
# program or two, run a step or two (16 s against 33 s for the 8-device worker).
UNOPTIMISED = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
jax.devices()  # this process's CPU client, with the flags above; its subprocesses get these:
os.environ["XLA_FLAGS"] = f"{DEFAULT_XLA_FLAGS} {SUITE_XLA_FLAGS}".strip()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests first, then those on the real data, which run the trainer (stable
    otherwise): under pytest-xdist (`-n auto --dist=worksteal`) the workers then finish at
    about the same time. A module stays together in one worker's share: dealing the tests out
    one by one ran module fixtures (a two-process run, reference runs) in both workers, and
    took the suite from about 1,100 to 1,190 s."""
    items.sort(key=lambda item: (item.get_closest_marker("longest") is None,
                                 "fashion_mnist_dir" not in getattr(item, "fixturenames", ())))


def pytest_unconfigure(config) -> None:
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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
# Each epoch evaluates 64 test images (the whole split took 1.9 s of a 3-epoch run's ~6 s of
# device time); the tests that compare with the whole split ask for it.
TINY = ["--image_size=16", "--stem=small", "--width=4", "--batch_size=32",
        "--train_examples=256", "--steps_per_dispatch=1", "--eval_examples=64"]
WHOLE_TEST_SPLIT = "--eval_examples=10000"


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


@pytest.fixture
def sigint_not_ignored():
    """A child inherits an ignored SIGINT (the suite run in the background by a non-interactive
    shell ignores it; train.py then rightly leaves it ignored); a terminal's Ctrl-C is not."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
