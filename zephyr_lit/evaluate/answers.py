"""The model under test answers conversations turn by turn, through the one generation path.

Turn ``t`` of every conversation goes out in one ``backend.generate`` call, each request carrying the
conversation so far (the user turns and the model's own earlier answers), so a second turn sees the
first answer. The model's chat template is applied by the backend (``generation.generate_with_model``
for ``HFBackend``). Each request is seeded by ``(seed, key, turn)``: the same question gets the same
answer in any batch, on a rerun, or in another chunk.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from zephyr_lit.generation import Backend, ChatRequest, Sampling, request_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conversation:
    """What to answer: the user ``turns``, in order, sampled with ``sampling``; ``key`` seeds it."""

    key: str
    turns: tuple[str, ...]
    sampling: Sampling


def turn_requests(items: Sequence[Conversation], histories: list[list[dict]], turn: int,
                  seed: int) -> list[ChatRequest]:
    """Turn ``turn`` (0-based) of each item: its history plus the next user message."""
    return [ChatRequest(history + [{"role": "user", "content": item.turns[turn]}], item.sampling,
                        request_seed(seed, item.key, turn + 1)) for item, history in zip(items, histories)]


def answer_conversations(backend: Backend, items: Sequence[Conversation], seed: int) -> list[tuple[str, ...] | None]:
    """Each item's answers, one per turn; None for an item whose request failed at some turn."""
    histories: list[list[dict]] = [[] for _ in items]
    failed = [False] * len(items)
    for turn in range(max((len(i.turns) for i in items), default=0)):
        todo = [k for k, item in enumerate(items) if not failed[k] and turn < len(item.turns)]
        requests = turn_requests([items[k] for k in todo], [histories[k] for k in todo], turn, seed)
        for k, request, reply in zip(todo, requests, backend.generate(requests)):
            if reply.finish_reason == "error":
                failed[k] = True
                log.warning("the model's request for %s failed: %s", items[k].key, reply.error)
                continue
            histories[k] = list(request.messages) + [{"role": "assistant", "content": reply.text}]
    return [None if failed[k] else tuple(m["content"] for m in histories[k] if m["role"] == "assistant")
            for k in range(len(items))]


def answer_id(model_id: str, key: object, answers: Sequence[str]) -> str:
    """A 22-character id of one model's answers to one question (unique per model and question)."""
    text = "\x1f".join([model_id, str(key), *answers])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:22]
