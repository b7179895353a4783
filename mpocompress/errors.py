"""The one exception type mpocompress raises for problems a user can fix."""

from __future__ import annotations


class MPOCompressError(ValueError):
    """A problem with the user's input: its message says what is wrong and how to fix it.

    The command-line interface prints the message on one line and exits with status 2.
    """
