"""Held-out prompts with one checkable answer, for ``val/exact_match``."""

from __future__ import annotations

import json

from zephyr_lit.data.validate import check_messages
from zephyr_lit.errors import DataError


def load_exact_match(path: str) -> list[dict]:
    """Rows ``{prompt_id, messages, answer}``: prompts with one checkable answer."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if not line.strip():
                continue
            row = json.loads(line)
            at = f"{path} row {index}"
            if not isinstance(row.get("answer"), str):
                raise DataError(f"{at}: field 'answer' must be a string")
            check_messages([*row.get("messages", []), {"role": "assistant", "content": row["answer"]}], at)
            rows.append(row)
    return rows
