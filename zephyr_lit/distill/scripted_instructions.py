"""The embedded default's instruction writer for ``stage=instructions``: offline and deterministic.

It reads its request back (``instructions.read_request``: the tasks shown, how many are asked for)
and answers with a numbered list of that many questions drawn with ``random.Random(request.seed)``
from every question the embedded generator knows (``facts.questions()``, in sorted order, so the draw
is stable), leaving out the ones shown. The scripted personas and user can answer each of them, so its
output feeds ``stage=dialogues`` and ``stage=completions`` on the embedded default.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import cache

from zephyr_lit.distill.facts import questions
from zephyr_lit.distill.instructions import read_request
from zephyr_lit.generation import ChatRequest, Reply


@cache
def known_questions() -> tuple[str, ...]:
    """Every question the embedded generator asks, sorted."""
    return tuple(sorted(questions()))


class ScriptedInstructor:
    """Answers ``stage=instructions`` requests with known questions (see the module docstring). A
    request it cannot read back gets ``Reply("", "error", error=...)``."""

    def __init__(self, name: str = "scripted-instructor") -> None:
        self.name = name

    def generate(self, requests: Sequence[ChatRequest]) -> list[Reply]:
        return [self.write(r) for r in requests]

    def write(self, request: ChatRequest) -> Reply:
        messages = list(request.messages)
        if not messages or messages[-1].get("role") != "user":
            return Reply("", "error", error=f"{self.name}: the request does not end with a user turn")
        try:
            shown, wanted = read_request(messages[-1]["content"])
        except ValueError as e:
            return Reply("", "error", error=f"{self.name}: not an instructions request ({e})")
        left_out = set(shown)
        fresh = [q for q in known_questions() if q not in left_out]
        drawn = random.Random(request.seed).sample(fresh, min(wanted, len(fresh)))
        return Reply("\n".join(f"{k}. {question}" for k, question in enumerate(drawn, 1)))
