"""The evaluation files read: FastChat's ``llm_judge`` questions and answers, AlpacaEval's sets.

Every reader checks each row and raises one ``DataError`` line naming the file, the row (1-based line
or list index), the field and what to do, before any model loads. Lines are read, and the task's files written atomically, by ``zephyr_lit.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from zephyr_lit.errors import DataError
from zephyr_lit.jsonl import read_jsonl, string_fields

QuestionId = int | str


@dataclass(frozen=True)
class Question:
    """One MT-Bench question: its turns (1 or 2 user messages) and, where given, a reference answer per turn."""

    question_id: QuestionId
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None


def strings(value: object, where: str, field: str, count: tuple[int, ...]) -> tuple[str, ...]:
    """``value`` as a tuple of non-empty strings whose length is one of ``count``."""
    ok = isinstance(value, list) and len(value) in count and all(isinstance(t, str) and t.strip() for t in value)
    if not ok:
        raise DataError(f"{where}, field {field!r}: expected a list of {' or '.join(map(str, count))} non-empty "
                        f"strings, got {json.dumps(value)[:80]}", field=field)
    return tuple(value)


def read_questions(path: str | Path) -> list[Question]:
    """The questions of a FastChat ``question.jsonl``: question_id, category, turns, optional reference."""
    questions, seen = [], {}
    for number, row in read_jsonl(path):
        where = f"{path} line {number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with question_id, category and turns")
        qid = row.get("question_id")
        if not isinstance(qid, (int, str)) or isinstance(qid, bool):
            raise DataError(f"{where}, field 'question_id': missing or not an int or string", field="question_id")
        if qid in seen:
            raise DataError(f"{where}, field 'question_id': {qid!r} is also on line {seen[qid]}; ids must be unique",
                            field="question_id")
        seen[qid] = number
        if not isinstance(row.get("category"), str) or not row["category"]:
            raise DataError(f"{where}, field 'category': missing or not a string", field="category")
        turns = strings(row.get("turns"), where, "turns", (1, 2))
        reference = row.get("reference")
        if reference is not None:
            reference = strings(reference, where, "reference", (len(turns),))
        questions.append(Question(qid, row["category"], turns, reference))
    if not questions:
        raise DataError(f"{path}: no questions")
    return questions


def read_answer_turns(path: str | Path) -> dict[QuestionId, tuple[str, ...]]:
    """question_id -> the answer's turns, from a FastChat answer file (``choices[0].turns``)."""
    answers = {}
    for number, row in read_jsonl(path):
        where = f"{path} line {number}"
        try:
            answers[row["question_id"]] = tuple(row["choices"][0]["turns"])
        except (KeyError, IndexError, TypeError):
            raise DataError(f"{where}: expected question_id and choices: [{{index: 0, turns: [...]}}]") from None
    return answers


def read_alpaca(path: str | Path, needs_output: bool) -> list[dict]:
    """The rows of an AlpacaEval file (a JSON list, or JSON lines): ``instruction`` and, when
    ``needs_output``, ``output``; ``generator`` and ``dataset`` are kept when present."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        rows = list(enumerate(data if isinstance(data, list) else [data]))
    except json.JSONDecodeError:
        rows = [(number - 1, row) for number, row in read_jsonl(path)]
    fields = ("instruction", "output") if needs_output else ("instruction",)
    for index, row in rows:
        string_fields(row, f"{path} row {index}", fields)
    if not rows:
        raise DataError(f"{path}: no rows")
    return [row for _, row in rows]
