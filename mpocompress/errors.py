"""The one exception type mpocompress raises for problems a user can fix."""

from __future__ import annotations


class MPOCompressError(ValueError):
    """A problem with the user's input: its message says what is wrong and how to fix it.

    The command-line interface prints the message on one line and exits with status 2.
    """


def check_all(checks: list[tuple[bool, str]]) -> None:
    """Raise MPOCompressError with the message of the first failed (ok, message) check."""
    for ok, message in checks:
        if not ok:
            raise MPOCompressError(message)


OUT_OF_MEMORY = ("can't allocate memory", "cannot allocate memory", "out of memory", "could not create a primitive")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether an exception is the machine running out of memory (Python's MemoryError, or torch's
    allocator failing, which raises RuntimeError; oneDNN reports it as a primitive it could not create)."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(m in str(e).lower() for m in OUT_OF_MEMORY))


class Interrupted(Exception):
    """A run stopped on request (Ctrl-C or SIGTERM) after saving what it needs to resume.

    The command-line interface prints the message on one line and exits with 128 + the signal
    number: 130 for SIGINT, 143 for SIGTERM.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
