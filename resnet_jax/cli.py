"""What the scripts share: one-line errors with fixed exit codes, quiet library logging."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

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
