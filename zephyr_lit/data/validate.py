"""Row checks for chat data. Each failure is one line naming file, split, row and field."""

from __future__ import annotations

from typing import Any

from zephyr_lit.chat import ROLES
from zephyr_lit.errors import DataError


def where(source: str, split: str, row: int) -> str:
    return f"{source} split '{split}' row {row}"


def check_messages(messages: Any, at: str, field: str = "messages") -> list[dict]:
    """Check a message list and return it; raise ``DataError`` naming ``at`` and the field.

    Contract: a list of ``{role, content}`` dicts, roles in system/user/assistant, string contents,
    at least one assistant turn and no empty assistant turn.
    """
    if messages is None:
        raise DataError(f"{at}: field '{field}' is missing")
    if not isinstance(messages, list):
        raise DataError(f"{at}: field '{field}' must be a list of {{role, content}} messages, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{at}: field '{field}[{i}]' must be a {{role, content}} dict, got {message!r:.80}")
        if message["role"] not in ROLES:
            raise DataError(f"{at}: field '{field}[{i}].role' is {message['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{at}: field '{field}[{i}].content' must be a string, got {type(message['content']).__name__}")
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(f"{at}: field '{field}[{i}].content' is an empty assistant turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{at}: field '{field}' has no assistant turn (nothing to train on)")
    return messages


def require_columns(column_names: list[str], required: tuple[str, ...], source: str, split: str) -> None:
    """Raise when a whole column is absent (then every row lacks the field; name row 0)."""
    for name in required:
        if name not in column_names:
            raise DataError(f"{where(source, split, 0)}: field '{name}' is missing (columns: {', '.join(column_names)})")
