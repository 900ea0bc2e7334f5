"""JSON files read and written outside the training data: line-numbered reading whose errors name the
file and line (``DataError``, one line), and atomic writes (``atomic_write``: a killed run leaves the
previous complete file)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from zephyr_lit.checkpointing import atomic_write
from zephyr_lit.errors import DataError


def read_jsonl(path: str | Path) -> list[tuple[int, object]]:
    """(line number, parsed value) of every non-empty line; a line that is not JSON is a DataError."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {number}: not JSON ({error.msg}); one object per line") from None
    return rows


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One JSON object a line, replacing ``path`` atomically."""
    with atomic_write(path, encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_json(path: Path, value: object) -> None:
    """``value`` as indented JSON, replacing ``path`` atomically."""
    with atomic_write(path, encoding="utf-8") as handle:
        handle.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def string_fields(row: object, where: str, fields: tuple[str, ...]) -> dict:
    """``row``, checked to be an object whose ``fields`` all hold strings; else a DataError naming
    ``where`` (file and line or row) and the field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with {', '.join(fields)}")
    for field in fields:
        if not isinstance(row.get(field), str):
            raise DataError(f"{where}, field {field!r}: missing or not a string", field=field)
    return row
