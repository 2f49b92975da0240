"""Errors a user can fix.

A `UserError` is bad input (a flag, a file, a model path): the CLI prints its message on one line and
exits with status 2, without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input that the user can fix; the message says what is wrong and how to fix it."""

    exit_code = 2


class Interrupted(UserError):
    """The user stopped the run (Ctrl-C) after what it had done was saved; the message says how to resume."""

    exit_code = 130


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message for a one-line error: its first non-empty line, whitespace collapsed, at most `limit`
    characters (a library's message may span many lines)."""
    line = next((text for text in str(error).splitlines() if text.strip()), "")
    return " ".join(line.split())[:limit] or type(error).__name__
