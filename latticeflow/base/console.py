"""Log records to the terminal: one handler on the root logger that writes to ``sys.stderr``.

The handler looks ``sys.stderr`` up when a record is emitted, not when it is created, so code
that swaps the stream (pytest's capture, ``tqdm.contrib.logging``) never leaves it writing to a
closed one. Installing it again replaces the previous one. Errors reach the terminal as one
line (:func:`one_line`).
"""

from __future__ import annotations

import logging
import sys


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def install_stderr_handler(fmt: str) -> StderrHandler:
    """Put a :class:`StderrHandler` with format ``fmt`` on the root logger (replacing one
    installed before) and return it."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StderrHandler)]:
        root.removeHandler(handler)
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    return handler


def one_line(message: object) -> str:
    """``message`` with all whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(message).split())
