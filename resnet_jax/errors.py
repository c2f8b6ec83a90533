"""The project's own exceptions: a mistake in the user's input, and a diverged run."""


class UserError(Exception):
    """A mistake in the user's input (a flag, a data folder, a workdir).

    Scripts catch it and print its message as one line, exiting with status 2, instead of a
    traceback. The message must be a single line that says what is wrong and what would be valid.
    """


class DivergedError(RuntimeError):
    """The loss became NaN or Inf (scripts exit with status 3)."""
