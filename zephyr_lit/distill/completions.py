"""``stage=completions``: ``n`` answers per prompt from a pool of models, in the ``openbmb/UltraFeedback`` schema.

Per prompt, ``n`` pool members are drawn without replacement and each answer gets a principle (its
system prompt), all seeded by ``(seed, prompt key)``, so the draw of one prompt does not depend on any
other. Records are keyed ``(prompt key, completion index)``: a rerun does only what is missing.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from zephyr_lit.assets.generate import prompt_id
from zephyr_lit.distill.inputs import Prompt
from zephyr_lit.distill.store import StageOutput, StageStore
from zephyr_lit.generation import Backend, ChatRequest, Sampling, request_seed

log = logging.getLogger(__name__)

# The principle system prompts (UltraFeedback's four principles, in our words).
PRINCIPLES = {
    "helpfulness": (
        "You are a helpful assistant. Give the user what they asked for: a correct, complete and clear "
        "answer, with the details they need and nothing they do not."
    ),
    "honesty": (
        "You are an honest assistant. When you are not sure, say so, and when you do not know, say that "
        "instead of guessing. Never make up facts to sound confident."
    ),
    "truthfulness": (
        "You are a truthful assistant. Say only what is correct and supported by the question or by "
        "well-established knowledge; do not add invented details."
    ),
    "verbalized_calibration": (
        "You are a careful assistant. Answer the question, then say how confident you are in the answer "
        "on a line of its own, as a percentage, for example 'Confidence: 90%'."
    ),
}


@dataclass
class CompletionsSettings:
    """``n`` answers per prompt; ``principles`` weights the principle drawn for each answer."""

    n: int = 4
    principles: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PRINCIPLES, 1.0))
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    chunk_size: int = 64  # prompts per round of backend calls (and per append)
    max_prompts: int | None = None  # answer only this many prompts: the first by (prompt_id, key), None: all


def completions_problems(settings: CompletionsSettings, pool_size: int) -> list[str]:
    problems = []
    if settings.n < 2:
        problems.append(f"completions.n={settings.n}: a preference pair needs at least 2 answers per prompt")
    if pool_size < settings.n:
        problems.append(f"completions.pool has {pool_size} models, fewer than completions.n={settings.n}: "
                        "each prompt draws n different models; add models or lower completions.n")
    unknown = sorted(set(settings.principles) - set(PRINCIPLES))
    if unknown:
        problems.append(f"completions.principles: unknown {unknown}; known: {', '.join(PRINCIPLES)}")
    if settings.principles and sum(settings.principles.values()) <= 0:
        problems.append("completions.principles: the weights must add up to more than 0")
    if settings.chunk_size < 1:
        problems.append(f"completions.chunk_size={settings.chunk_size} must be at least 1")
    if settings.max_prompts is not None and settings.max_prompts < 1:
        problems.append(f"completions.max_prompts={settings.max_prompts} must be at least 1 (or null: all)")
    return problems


def first_prompts(prompts: list[Prompt], max_prompts: int | None) -> list[Prompt]:
    """All of ``prompts``, or the ``max_prompts`` first by (prompt_id, key): a subset that does not
    depend on the input's order (sha256 order is as good as a shuffle)."""
    if max_prompts is None or max_prompts >= len(prompts):
        return prompts
    chosen = {p.key for p in sorted(prompts, key=lambda p: (prompt_id(p.prompt), p.key))[:max_prompts]}
    return [p for p in prompts if p.key in chosen]


def draw(prompt: Prompt, pool_size: int, settings: CompletionsSettings, seed: int) -> list[tuple[int, str]]:
    """``n`` (pool member, principle) pairs for ``prompt``: members without replacement."""
    rng = random.Random(request_seed(seed, prompt.key, "completions"))
    members = rng.sample(range(pool_size), settings.n)
    names = list(settings.principles)
    weights = [settings.principles[n] for n in names]
    return [(member, rng.choices(names, weights)[0]) for member in members]


def with_principle(messages: Sequence[dict], principle: str) -> list[dict]:
    """The prompt with the principle as its system prompt (after the prompt's own system prompt)."""
    text = PRINCIPLES[principle]
    if messages and messages[0]["role"] == "system":
        own = messages[0]["content"]
        return [{"role": "system", "content": f"{own}\n\n{text}" if own else text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def answer_prompts(
    prompts: list[Prompt], pool: Sequence[Backend], settings: CompletionsSettings, seed: int, store: StageStore
) -> dict[str, int]:
    """Answer ``prompts`` (what ``store`` lacks), appending records; this call's counts."""
    records = {(r["key"], r["index"]) for r in store.done()}
    counts = {"prompts": len(prompts), "resumed": 0, "failed": 0, "cut": 0}
    sampling = Sampling(settings.temperature, settings.top_p, settings.max_new_tokens)
    for start in range(0, len(prompts), settings.chunk_size):
        jobs: dict[int, list[tuple[Prompt, int, str]]] = {}
        for prompt in prompts[start : start + settings.chunk_size]:
            for index, (member, principle) in enumerate(draw(prompt, len(pool), settings, seed)):
                if (prompt.key, index) in records:
                    counts["resumed"] += 1
                else:
                    jobs.setdefault(member, []).append((prompt, index, principle))
        fresh = []
        for member, todo in sorted(jobs.items()):
            requests = [
                ChatRequest(with_principle(p.messages, principle), sampling, request_seed(seed, p.key, index))
                for p, index, principle in todo
            ]
            for (prompt, index, principle), reply in zip(todo, pool[member].generate(requests)):
                if reply.finish_reason == "error":
                    counts["failed"] += 1
                    log.warning("completions: %s failed on a prompt (%s)", pool[member].name, reply.error)
                    continue
                counts["cut"] += reply.finish_reason == "length"
                fresh.append({"key": prompt.key, "index": index, "model": pool[member].name, "principle": principle,
                              "response": reply.text, "finish_reason": reply.finish_reason})
        store.append(fresh)
        log.info("completions: %d of %d prompts", min(start + settings.chunk_size, len(prompts)), len(prompts))
    return counts


def completion_rows(prompts: list[Prompt], settings: CompletionsSettings, records: list[dict]) -> list[dict]:
    """The UltraFeedback rows of ``prompts`` from every rank's ``records``, ordered by (prompt_id, key)."""
    by_unit = {(r["key"], r["index"]): r for r in records}
    ordered = sorted(prompts, key=lambda p: (prompt_id(p.prompt), p.key))
    return [ultrafeedback_row(p, [by_unit[(p.key, i)] for i in range(settings.n) if (p.key, i) in by_unit])
            for p in ordered]


def run_completions(
    prompts: list[Prompt], pool: Sequence[Backend], settings: CompletionsSettings, seed: int, store: StageStore
) -> StageOutput:
    """Answer every prompt (what ``store`` lacks) in this process; the UltraFeedback rows as split ``train``."""
    counts = answer_prompts(prompts, pool, settings, seed, store)
    rows = completion_rows(prompts, settings, store.done())
    counts["completions"] = sum(len(r["completions"]) for r in rows)
    return StageOutput({"train": rows}, counts)


def ultrafeedback_row(prompt: Prompt, records: list[dict]) -> dict:
    """One prompt's row in the ``openbmb/UltraFeedback`` schema, plus ``prompt``, ``prompt_id`` and
    ``messages`` (the prompt conversation, so a system prompt or earlier turns are kept)."""
    return {
        "source": prompt.source,
        "instruction": prompt.instruction,
        "prompt": prompt.prompt,
        "prompt_id": prompt_id(prompt.prompt),
        "messages": list(prompt.messages),
        "models": [r["model"] for r in records],
        "completions": [
            {
                "model": r["model"],
                "principle": r["principle"],
                "custom_system_prompt": PRINCIPLES[r["principle"]],
                "response": r["response"],
                "annotations": None,
                "fine-grained_score": None,
                "overall_score": None,
                "critique": None,
            }
            for r in records
        ],
    }
