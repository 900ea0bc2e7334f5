"""Errors a user can fix: bad data, bad config. The entry point prints them as one line."""


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
