"""Errors a user can fix: bad data, bad config. The entry point prints them as one line."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserInputError(ValueError):
    """Something in the user's data or config is wrong; the message says what, where and what to do."""


class DataError(UserInputError):
    """A data row breaks the schema. Raised before any model is loaded. ``field`` and ``reason`` (a short
    code such as ``empty_assistant``) say what, for ``data.bad_rows=drop``'s counts and list."""

    def __init__(self, message: str, *, field: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.field, self.reason = field, reason


class ConfigError(UserInputError):
    """One or more config values are invalid; all problems are listed in one message."""


@contextmanager
def one_line_errors() -> Iterator[None]:
    """For the entry points (``train.py``, ``python -m zephyr_lit.distill|evaluate``): a ``UserInputError``
    raised inside is printed as ``error: <message>`` on stderr and the process exits with status 2."""
    try:
        yield
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
