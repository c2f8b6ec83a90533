"""What the scripts share: one-line errors with fixed exit codes, quiet library logging."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


def quiet_logs() -> None:
    """Keeps library INFO chatter (Orbax, absl) off the terminal; warnings still show."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass
    logging.getLogger().setLevel(logging.WARNING)


def check_writable(folder: str | Path, flag: str) -> None:
    """Creates `folder` if needed and checks that files can be written there (one-line error)."""
    from resnet_jax.errors import UserError

    path = Path(folder)
    if not str(folder):
        raise UserError(f"{flag} is empty; give a path")
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable: {e.strerror or e}") from None


def run_main(prog: str, job: Callable[[], int]) -> int:
    """Runs `job`, turning the project's expected failures into one line and an exit status."""
    quiet_logs()
    from resnet_jax.errors import UserError

    try:
        return job()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # before training installed its handler, or a second Ctrl-C
        _exit_interrupted(prog)
    except Exception as e:
        from resnet_jax.train import DivergedError

        if isinstance(e, DivergedError):
            print(f"{prog}: error: {e}", file=sys.stderr)
            return EXIT_DIVERGED
        if "RESOURCE_EXHAUSTED" in str(e) and type(e).__name__.endswith("RuntimeError"):
            # XLA could not allocate: the input asked too much of the device, not a bug.
            reason = " ".join(str(e).split())[:300]
            print(f"{prog}: error: out of device memory ({reason}); use a smaller --batch_size, "
                  "--image_size or model", file=sys.stderr)
            return EXIT_USER_ERROR
        raise


def _exit_interrupted(prog: str) -> None:
    print(f"{prog}: interrupted", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # At once, without the interpreter's teardown: a compilation may still be running on a
    # worker thread, and finalising Python under it can crash the process.
    os._exit(130)


def main_guard(prog: str, main: Callable[[], int]) -> None:
    """Runs a script's `main` (imports included) and exits with its status; Ctrl-C is one line."""
    try:
        status = main()
    except KeyboardInterrupt:
        _exit_interrupted(prog)
    sys.exit(status)
