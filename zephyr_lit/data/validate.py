"""Row checks for chat data. Each failure is one line naming file, split, row and field."""

from __future__ import annotations

import json
from collections.abc import Callable
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
        raise DataError(f"{at}: field '{field}' is missing", field=field, reason="missing")
    if not isinstance(messages, list):
        raise DataError(f"{at}: field '{field}' must be a list of {{role, content}} messages, got {type(messages).__name__}",
                        field=field, reason="not_a_list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{at}: field '{field}[{i}]' must be a {{role, content}} dict, got {message!r:.80}",
                            field=f"{field}[{i}]", reason="not_a_message")
        if message["role"] not in ROLES:
            raise DataError(f"{at}: field '{field}[{i}].role' is {message['role']!r}; expected one of {', '.join(ROLES)}",
                            field=f"{field}[{i}].role", reason="unknown_role")
        if not isinstance(message["content"], str):
            raise DataError(f"{at}: field '{field}[{i}].content' must be a string, got {type(message['content']).__name__}",
                            field=f"{field}[{i}].content", reason="content_not_a_string")
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(f"{at}: field '{field}[{i}].content' is an empty assistant turn",
                            field=f"{field}[{i}].content", reason="empty_assistant")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{at}: field '{field}' has no assistant turn (nothing to train on)", field=field,
                        reason="no_assistant")
    return messages


def require_columns(column_names: list[str], required: tuple[str, ...], source: str, split: str) -> None:
    """Raise when a whole column is absent (then every row lacks the field; name row 0)."""
    for name in required:
        if name not in column_names:
            raise DataError(f"{where(source, split, 0)}: field '{name}' is missing (columns: {', '.join(column_names)})")


BAD_ROWS = ("error", "drop")


def row_problem(check: Callable[[], Any], bad_rows: str, row: int) -> str:
    """Run a row's ``check``; ``""`` when it passes. On a ``DataError``: with ``bad_rows="error"``
    re-raise it, with ``"drop"`` return it as JSON (row, field, reason, message) for ``bad_row_report``."""
    try:
        check()
    except DataError as error:
        if bad_rows != "drop":
            raise
        return json.dumps({"row": row, "field": error.field, "reason": error.reason or "invalid", "message": str(error)})
    return ""


def bad_row_report(problems: list[str], rows: int, max_fraction: float, source: str, split: str) -> list[dict]:
    """The dropped rows of one split (``row_problem``'s non-empty results) as dicts naming file and split;
    a ``DataError`` naming the first few when more than ``max_fraction`` of ``rows`` are bad."""
    bad = [dict(json.loads(p), file=source, split=split) for p in problems if p]
    if bad and len(bad) > max_fraction * rows:
        first = "; ".join(b["message"] for b in bad[:3])
        raise DataError(
            f"{source} split '{split}': {len(bad)} of {rows} rows are bad ({len(bad) / rows:.2%} > "
            f"data.max_bad_fraction={max_fraction}); first: {first}"
        )
    return bad


def reasons(bad: list[dict]) -> dict[str, int]:
    """``{reason: count}`` of ``bad_row_report``'s rows."""
    counts: dict[str, int] = {}
    for row in bad:
        counts[row["reason"]] = counts.get(row["reason"], 0) + 1
    return counts
