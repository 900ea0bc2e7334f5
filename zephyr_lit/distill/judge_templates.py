"""Judge prompt files in FastChat's ``judge_prompts.jsonl`` schema: load, fill, read back, parse the verdicts.

One JSON object a line: ``name``, ``type`` (``single`` | ``pairwise``), ``system_prompt``,
``prompt_template`` (``str.format`` fields such as ``{question}``, ``{answer}``, ``{ref_answer_1}``,
``{question_1}``..``{answer_2}``, ``{answer_a}``/``{answer_b}``), ``output_format`` (``[[rating]]``: a
1-10 grade in double brackets; ``[[A]]``: ``[[A]]``, ``[[B]]`` or ``[[C]]`` for a tie) and an optional
``category``. The entries used are picked by name (``SINGLE``, ``PAIR``), so FastChat's own file and
the project's (``zephyr_lit/assets/data/eval/judge_prompts.jsonl``, its own wording) are
interchangeable. ``read_back`` inverts a filled template, for the rule judge.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from zephyr_lit.errors import DataError
from zephyr_lit.jsonl import read_jsonl, string_fields

# (multi-turn, with a reference) -> the entry's name; the names are FastChat's
SINGLE = {(False, False): "single-v1", (False, True): "single-math-v1",
          (True, False): "single-v1-multi-turn", (True, True): "single-math-v1-multi-turn"}
PAIR = "pair-v2"  # AlpacaEval-style comparisons: {question}, {answer_a}, {answer_b}
FIELDS = ("name", "type", "system_prompt", "prompt_template", "output_format")
FORMATS = {"single": "[[rating]]", "pairwise": "[[A]]"}
RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]")  # [[7]], [[ 7.5 ]], [[7/10]]
CHOICE = re.compile(r"\[\[\s*([ABC])\s*\]\]")
TIE = "tie"


@dataclass(frozen=True)
class JudgePrompt:
    """One entry of a judge prompt file."""

    name: str
    type: str
    system_prompt: str
    prompt_template: str
    output_format: str
    category: str | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        """The template's ``{field}`` names, in order."""
        return tuple(f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f)

    def messages(self, **fields: str) -> list[dict]:
        """The judge's chat: the system prompt (when not empty), then the filled template."""
        user = self.prompt_template.format(**fields)
        return ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
            {"role": "user", "content": user}]


def load_judge_prompts(path: str | Path) -> dict[str, JudgePrompt]:
    """Every entry of ``path`` by name; a bad line is a ``DataError`` naming the file, line and field."""
    prompts: dict[str, JudgePrompt] = {}
    for number, row in read_jsonl(path):
        where = f"{path} line {number}"
        string_fields(row, where, FIELDS)
        prompt = JudgePrompt(**{key: row[key] for key in FIELDS}, category=row.get("category"))
        try:
            prompt.fields
        except ValueError as error:
            raise DataError(f"{where}, field 'prompt_template': {error} (write literal braces as {{{{ }}}})",
                            field="prompt_template") from None
        prompts[prompt.name] = prompt
    return prompts


def pick(prompts: dict[str, JudgePrompt], name: str, needs: tuple[str, ...], source: object) -> JudgePrompt:
    """Entry ``name`` of ``prompts``, checked to hold every field in ``needs`` and the verdict format of its type."""
    prompt = prompts.get(name)
    if prompt is None:
        raise DataError(f"{source}: no judge prompt named {name!r} (it has {', '.join(sorted(prompts)) or 'none'})")
    missing = [f for f in needs if f not in prompt.fields]
    if missing:
        fields = ", ".join("{" + f + "}" for f in missing)
        raise DataError(f"{source}, prompt {name!r}: its prompt_template lacks {fields}")
    if FORMATS.get(prompt.type) != prompt.output_format:
        raise DataError(f"{source}, prompt {name!r}: type {prompt.type!r} with output_format {prompt.output_format!r}; "
                        f"expected one of {FORMATS}")
    return prompt


def read_back(prompt: JudgePrompt, messages: list[dict]) -> dict[str, str] | None:
    """The fields that filled ``prompt`` into ``messages``' last user turn; None when it is not ``prompt``'s."""
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
    match = template_pattern(prompt.prompt_template).fullmatch(user or "")
    return match.groupdict() if match else None


@cache
def template_pattern(template: str) -> re.Pattern[str]:
    """A regex that matches ``template`` filled with any texts, one named group per field."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field:
            parts.append(f"(?P={field})" if f"(?P<{field}>" in "".join(parts) else f"(?P<{field}>.*?)")
    return re.compile("".join(parts), re.DOTALL)


def parse_rating(reply: str) -> int | float | None:
    """The last ``[[N]]`` (1 <= N <= 10, decimals allowed, ``[[N/10]]`` too) in ``reply``, an int when written
    as one (as FastChat reads it); None without one or out of range."""
    found = RATING.findall(reply or "")
    if not found:
        return None
    value = int(found[-1]) if found[-1].isdigit() else float(found[-1])
    return value if 1 <= value <= 10 else None


def parse_choice(reply: str) -> str | None:
    """The last verdict in ``reply``: ``"A"``, ``"B"`` or ``"tie"`` (``[[C]]``); None without one."""
    found = CHOICE.findall(reply or "")
    return None if not found else TIE if found[-1] == "C" else found[-1]


def format_rating(reason: str, rating: int | float) -> str:
    """A rating reply in the ``[[rating]]`` format."""
    return f"{reason}\nRating: [[{rating}]]"


def format_choice(reason: str, choice: str) -> str:
    """A comparison reply in the ``[[A]]`` format (``tie`` is ``[[C]]``)."""
    return f"{reason}\nVerdict: [[{'C' if choice == TIE else choice}]]"
