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
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from resnet_jax.train import DivergedError

        if isinstance(e, DivergedError):
            print(f"{prog}: error: {e}", file=sys.stderr)
            return EXIT_DIVERGED
        raise
