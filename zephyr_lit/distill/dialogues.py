"""``stage=dialogues``: UltraChat-style dialogues, one model playing the user and another (the teacher) answering.

Each seed question opens a dialogue of ``rounds`` user/assistant rounds, drawn per dialogue from
``dialogues.turns`` (inclusive, as UltraChat's 3-7) with ``(seed, dialogue key)``. In every round the
assistant answers the conversation so far; before every round after the first, the user backend
writes the next user turn from ``user_view(messages)``: the conversation with the roles flipped (the
assistant's replies are its "user" turns) behind ``USER_ROLE``, so any chat model can play the user.

A reply that is empty or cut off (``finish_reason == "length"``) is asked again with a new seed up to
``retries`` times; then the dialogue is dropped (counted by reason). A failed request (no reply)
leaves the dialogue unrecorded, so rerunning the command retries it. Records are one per finished
dialogue, keyed by the seed conversation, so a killed run continues where it stopped.

Output, the ``HuggingFaceH4/ultrachat_200k`` layout (rows ``prompt``, ``prompt_id`` = sha256 hex of the
prompt, ``messages``), ordered by (prompt_id, key): ``train_sft`` and ``test_sft`` (``test_size``
dialogues, drawn with the seed), and ``train_gen`` / ``test_gen``, the same rows cut after their first
user turn (a system turn stays: it is part of the prompt).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from zephyr_lit.assets.generate import prompt_id
from zephyr_lit.distill.inputs import Prompt
from zephyr_lit.distill.store import StageOutput, StageStore
from zephyr_lit.generation import Backend, ChatRequest, Reply, Sampling, request_seed

log = logging.getLogger(__name__)

USER_ROLE = (
    "You are the user in a conversation with an AI assistant, and you speak for the user only. Here "
    "the assistant's replies appear as the user's turns and your earlier messages as the assistant's. "
    "Write the user's next message: a follow-up question or request that carries the conversation on, "
    "as a curious person would. Write the message alone, with no preface, no quotes and no answer."
)
FLIP = {"user": "assistant", "assistant": "user"}


@dataclass
class DialoguesSettings:
    """``turns``: the inclusive range of rounds; ``test_size``: dialogues in ``test_sft``."""

    turns: tuple[int, int] = (1, 3)
    test_size: int = 200
    retries: int = 2
    chunk_size: int = 64  # dialogues per round of calls (and per append to the work file)


@dataclass(frozen=True)
class Speaker:
    """One side of the dialogue: its backend and how it samples."""

    backend: Backend
    sampling: Sampling
    role: str  # "user" or "assistant"


def dialogues_problems(settings: DialoguesSettings) -> list[str]:
    problems = []
    turns = list(settings.turns)
    if len(turns) != 2 or not all(isinstance(t, int) for t in turns) or not 1 <= turns[0] <= turns[1]:
        problems.append(f"dialogues.turns={turns}: give [min, max] rounds, 1 <= min <= max (UltraChat: [3, 7])")
    if settings.test_size < 0:
        problems.append(f"dialogues.test_size={settings.test_size} must be 0 or more")
    if settings.retries < 0:
        problems.append(f"dialogues.retries={settings.retries} must be 0 or more")
    if settings.chunk_size < 1:
        problems.append(f"dialogues.chunk_size={settings.chunk_size} must be at least 1")
    return problems


def rounds_of(seed_prompt: Prompt, settings: DialoguesSettings, seed: int) -> int:
    """How many user/assistant rounds this dialogue has, drawn from ``turns`` with (seed, key)."""
    low, high = settings.turns
    return random.Random(request_seed(seed, seed_prompt.key, "turns")).randint(low, high)


def user_view(messages: Sequence[dict]) -> list[dict]:
    """What the user backend sees: ``USER_ROLE``, then the turns with user and assistant swapped (the
    assistant's system prompt is not shown). It ends with a "user" turn: the assistant's last reply."""
    return [{"role": "system", "content": USER_ROLE}] + [
        {"role": FLIP[m["role"]], "content": m["content"]} for m in messages if m["role"] != "system"
    ]


@dataclass
class Dialogue:
    """A dialogue under way."""

    seed_prompt: Prompt
    rounds: int
    messages: list[dict]
    dropped: str | None = None
    failed: bool = False

    @property
    def active(self) -> bool:
        return self.dropped is None and not self.failed

    def finished(self) -> bool:
        return sum(m["role"] == "assistant" for m in self.messages) >= self.rounds


def speak(speaker: Speaker, dialogues: list[Dialogue], round_index: int, retries: int, seed: int,
          counts: dict[str, int]) -> None:
    """One turn of ``speaker`` in each of ``dialogues``, with retries; drops and failures marked."""
    pending = list(dialogues)
    for attempt in range(retries + 1):
        if not pending:
            return
        requests = [
            ChatRequest(user_view(d.messages) if speaker.role == "user" else list(d.messages), speaker.sampling,
                        request_seed(seed, d.seed_prompt.key, round_index, speaker.role, attempt))
            for d in pending
        ]
        replies: list[Reply] = speaker.backend.generate(requests)
        again = []
        for dialogue, reply in zip(pending, replies):
            if reply.finish_reason == "error":
                dialogue.failed = True
                counts["failed"] += 1
                log.warning("dialogues: the %s's request failed (%s)", speaker.role, reply.error)
            elif reply.ok:
                dialogue.messages.append({"role": speaker.role, "content": reply.text.strip()})
            else:
                counts["retries"] += attempt < retries
                again.append((dialogue, "cut" if reply.finish_reason == "length" else "empty"))
        if attempt == retries:
            for dialogue, why in again:
                dialogue.dropped = f"{speaker.role}_{why}"
        pending = [d for d, _ in again]


def write_dialogues(
    seeds: list[Prompt], user: Speaker, assistant: Speaker, settings: DialoguesSettings, seed: int, store: StageStore
) -> dict[str, int]:
    """Write the dialogues of ``seeds`` that ``store`` lacks, appending one record each; this call's counts."""
    done = {r["key"] for r in store.done()}
    counts = {"seeds": len(seeds), "resumed": 0, "failed": 0, "retries": 0}
    todo = [s for s in seeds if s.key not in done]
    counts["resumed"] = len(seeds) - len(todo)
    for start in range(0, len(todo), settings.chunk_size):
        chunk = [Dialogue(s, rounds_of(s, settings, seed), list(s.messages)) for s in todo[start : start + settings.chunk_size]]
        for round_index in range(max((d.rounds for d in chunk), default=0)):
            if round_index > 0:
                speak(user, [d for d in chunk if d.active and not d.finished()], round_index, settings.retries, seed, counts)
            speak(assistant, [d for d in chunk if d.active and not d.finished()], round_index, settings.retries, seed, counts)
        store.append({"key": d.seed_prompt.key, "messages": d.messages if d.dropped is None else None,
                      "dropped": d.dropped} for d in chunk if not d.failed)
        log.info("dialogues: %d of %d", min(start + settings.chunk_size, len(todo)), len(todo))
    return counts


def ultrachat_row(messages: list[dict]) -> dict:
    prompt = next(m["content"] for m in messages if m["role"] == "user")
    return {"prompt": prompt, "prompt_id": prompt_id(prompt), "messages": messages}


def first_turn(row: dict) -> dict:
    """The ``_gen`` form of a row: its messages cut after the first user turn."""
    first = next(i for i, m in enumerate(row["messages"]) if m["role"] == "user")
    return {**row, "messages": row["messages"][: first + 1]}


def dialogue_splits(seeds: list[Prompt], settings: DialoguesSettings, seed: int, records: list[dict]) -> StageOutput:
    """The four ultrachat_200k splits from every rank's ``records``, and the counts of what was kept."""
    by_key = {r["key"]: r for r in records}
    kept = [(s.key, ultrachat_row(by_key[s.key]["messages"])) for s in seeds
            if s.key in by_key and by_key[s.key]["messages"] is not None]
    dropped: dict[str, int] = {}
    for s in seeds:
        why = (by_key.get(s.key) or {}).get("dropped")
        if why:
            dropped[why] = dropped.get(why, 0) + 1
    if settings.test_size > len(kept) // 2:
        log.warning("dialogues: test_size=%d of only %d kept dialogues", settings.test_size, len(kept))
    test_keys = set(sorted((k for k, _ in kept), key=lambda k: request_seed(seed, k, "test_sft"))[: settings.test_size])
    ordered = sorted(kept, key=lambda kr: (kr[1]["prompt_id"], kr[0]))
    train = [row for key, row in ordered if key not in test_keys]
    test = [row for key, row in ordered if key in test_keys]
    splits = {"train_sft": train, "test_sft": test,
              "train_gen": [first_turn(r) for r in train], "test_gen": [first_turn(r) for r in test]}
    counts = {"dialogues": len(kept), "dropped": sum(dropped.values()),
              **{f"dropped_{why}": n for why, n in sorted(dropped.items())},
              "turns": sum(sum(m["role"] == "assistant" for m in r["messages"]) for _, r in kept)}
    return StageOutput(splits, counts)
