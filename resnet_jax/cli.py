"""What the scripts share: one-line errors with fixed exit codes, quiet library logging."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import threading
import warnings
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
    # A warning is one line for people, not the source line that raised it.
    warnings.formatwarning = lambda message, category, *_, **__: (
        f"warning: {message} ({category.__name__})\n")
    # A full disk: Orbax's writer threads log it with their tracebacks; run_main says it once.
    logging.getLogger("absl").addFilter(lambda record: not (
        _NO_SPACE in record.getMessage()
        or (record.exc_info and record.exc_info[1] and _disk_full(record.exc_info[1]))))


def check_writable(folder: str | Path, flag: str) -> None:
    """Creates `folder` if needed and checks that files can be written there (one-line error)."""
    from resnet_jax.errors import UserError

    path = Path(folder)
    if not str(folder):
        raise UserError(f"{flag} is empty; give a path")
    try:
        str(path.absolute()).encode("utf-8")
    except UnicodeEncodeError:  # Orbax's TensorStore takes only UTF-8 paths: fail now, not later
        raise UserError(f"{flag} {str(path.absolute())!a} is not a UTF-8 path") from None
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{socket.gethostname()}_{os.getpid()}"  # one per process
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
    except KeyboardInterrupt:  # where main_guard did not take the signals
        _exit_interrupted(prog)
    except Exception as e:
        from resnet_jax.errors import DivergedError

        if isinstance(e, DivergedError):
            print(f"{prog}: error: {e}", file=sys.stderr)
            return EXIT_DIVERGED
        if _disk_full(e):
            print(f"{prog}: error: no space left on the disk ({_first_line(e)}); free some, or "
                  "write elsewhere", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            # At once: the checkpoint and TensorBoard writers' exit handlers would fail again.
            os._exit(EXIT_USER_ERROR)
        if "RESOURCE_EXHAUSTED" in str(e) and type(e).__name__.endswith("RuntimeError"):
            # XLA could not allocate: the input asked too much of the device, not a bug.
            reason = " ".join(str(e).split())[:300]
            print(f"{prog}: error: out of device memory ({reason}); use a smaller --batch_size, "
                  "--image_size or model", file=sys.stderr)
            return EXIT_USER_ERROR
        if isinstance(e, MemoryError):  # numpy on the host: sizes that ask for too much
            print(f"{prog}: error: out of host memory ({_first_line(e)}); use smaller sizes",
                  file=sys.stderr)
            return EXIT_USER_ERROR
        raise


_NO_SPACE = "No space left on device"


def _disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it came from, is a full disk (ENOSPC)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or _NO_SPACE in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _first_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


def _exit_interrupted(prog: str, signum: int = signal.SIGINT) -> None:
    """The promised line and status (130 for SIGINT, 143 for SIGTERM), at once: without the
    interpreter's teardown, which can crash under a compilation still running on a worker
    thread. Safe inside a signal handler that interrupted a write to the standard streams."""
    word = "terminated" if signum == signal.SIGTERM else "interrupted"
    # What the script printed before stays printed. RuntimeError: a reentrant call (the signal
    # landed inside a write to the stream); the line goes to the descriptor, unbuffered.
    with contextlib.suppress(OSError, RuntimeError, ValueError):
        sys.stdout.flush()
    with contextlib.suppress(OSError, RuntimeError, ValueError):
        sys.stderr.flush()
    with contextlib.suppress(OSError):
        os.write(2, f"{prog}: {word}\n".encode())
    os._exit(128 + signum)


def _take_signals(prog: str) -> None:
    """SIGINT and SIGTERM, from here on, end the script at once with its line and status,
    whatever it is doing (imports, data loading, compilation, writing), outside training's own
    handler (which checkpoints, then restores this one).

    Not by raising KeyboardInterrupt, Python's default: raised in whatever Python code the main
    thread runs next, it is lost where an exception cannot propagate. JAX's `_xla_gc_callback`
    runs at every garbage collection, often while imports allocate: a signal that lands in it
    was printed as "Exception ignored in ... KeyboardInterrupt" and the run went on. Raised
    while jaxlib's C++ extension initialises (it imports numpy), it came out as an ImportError
    with a traceback and status 1, or the process died of SIGSEGV or SIGABRT in the half-done
    initialisation (all seen at 0.04-0.2 s after main started). A handler runs between two
    bytecodes of the main thread; exiting from there leaves nothing half done that matters:
    what the trainer writes is atomic (config.json, Orbax's checkpoints), as a SIGKILL at any
    moment shows. Signals the caller set otherwise (SIG_IGN under nohup, a handler of its
    own) are left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, default in ((signal.SIGINT, signal.default_int_handler),
                            (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(signum) == default:
            signal.signal(signum, lambda signum, frame: _exit_interrupted(prog, signum))


def main_guard(prog: str, main: Callable[[], int], fast_exit: bool = False) -> None:
    """Runs a script's `main` (imports included) and exits with its status; Ctrl-C, and SIGTERM
    outside training (which checkpoints instead), are one line and status 130 or 143.

    With `fast_exit`, a `main` that returned 0 must have written and closed everything it
    opened: the process then exits without the interpreter's teardown (see `exit_now`).
    """
    _take_signals(prog)  # before main's first import of JAX
    try:
        status = main()
    except KeyboardInterrupt:  # (where the signals were not ours to take)
        _exit_interrupted(prog)
    except BrokenPipeError:
        # The reader of our output went away (`... | head`): stop quietly, as a Unix tool does.
        # Output still buffered would fail again at exit; it goes nowhere instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 141  # 128 + SIGPIPE, what a shell reports for a tool the pipe stopped
    # Not under a profiler or tracer (cProfile, coverage): they write their results at exit.
    if fast_exit and status == 0 and sys.getprofile() is None and sys.gettrace() is None:
        exit_now(status)  # returns only where it cannot
    sys.exit(status)


def exit_now(status: int) -> None:
    """Exits without the interpreter's teardown, after what the interpreter would wait for:
    the other non-daemon threads (a compilation writing the persistent cache, say), the
    distributed system's shutdown (a barrier the other processes wait at), the logs and the
    standard streams.

    Finalising the interpreter tears down JAX's backends first (on a GPU: the client, its
    memory and streams), which on this CPU took 0.2-0.4 s after everything was written; the
    operating system reclaims all of it anyway. Only for a process whose files are all written
    and closed.
    """
    # What the interpreter does first at exit: tell thread pools' idle workers to stop, then
    # join every non-daemon thread. Without it (a Python that lacks it), exit the usual way.
    join_threads = getattr(threading, "_shutdown", None)
    if join_threads is None:
        return
    join_threads()
    if "jax" in sys.modules:
        import jax

        try:
            jax.distributed.shutdown()
        except Exception as e:  # the run's work is done and written: say so, keep the status
            print(f"warning: leaving the distributed system failed: {_first_line(e)}",
                  file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
