"""``stage=rate``: a judge rates every completion on UltraFeedback's four aspects (1-5, with rationales).

One judge call per aspect per prompt shows all of the prompt's completions, in an order shuffled by
``(seed, prompt key, aspect)``; the parsed ratings are put back in the completions' own order. A reply
the parser cannot read is asked again (``judge.retries`` times, each with its own seed), then the
aspect is left unrated and counted. ``critique=true`` adds one call per completion for a free-text
critique and an ``overall_score`` (1-10). Records are keyed ``(prompt key, unit)``, unit =
``aspect:<name>`` or ``critique:<index>``: a rerun does only what is missing.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from zephyr_lit.distill import rubrics
from zephyr_lit.distill.inputs import conversation_key
from zephyr_lit.distill.store import StageOutput, StageStore
from zephyr_lit.generation import Backend, ChatRequest, Reply, Sampling, request_seed

log = logging.getLogger(__name__)


@dataclass
class RateSettings:
    """What the judge is asked. ``retries``: extra asks after an unparseable reply."""

    aspects: list[str] = field(default_factory=lambda: list(rubrics.ASPECTS))
    critique: bool = False
    retries: int = 2
    temperature: float = 0.0
    max_new_tokens: int = 1024
    chunk_size: int = 16  # prompts per round of judge calls (and per append)


def rate_problems(settings: RateSettings) -> list[str]:
    problems = []
    unknown = sorted(set(settings.aspects) - set(rubrics.ASPECTS))
    if unknown or not settings.aspects:
        problems.append(f"rate.aspects={list(settings.aspects)}: use some of {', '.join(rubrics.ASPECTS)}")
    if settings.retries < 0:
        problems.append(f"judge.retries={settings.retries} must be at least 0")
    if settings.chunk_size < 1:
        problems.append(f"rate.chunk_size={settings.chunk_size} must be at least 1")
    return problems


@dataclass
class Unit:
    """One judge question: ``parse(reply)`` gives the record's fields, or None when unreadable."""

    key: str
    name: str
    request: Callable[[int], ChatRequest]  # attempt -> request
    parse: Callable[[str], dict | None]


def shuffled_order(seed: int, key: str, aspect: str, n: int) -> list[int]:
    """Position j of the judge's list shows completion ``order[j]``."""
    order = list(range(n))
    random.Random(request_seed(seed, key, aspect, "order")).shuffle(order)
    return order


def unshuffle(ratings: Sequence, order: Sequence[int]) -> list:
    """Ratings in the completions' own order: ``out[order[j]] = ratings[j]``."""
    out: list = [None] * len(order)
    for position, completion in enumerate(order):
        out[completion] = ratings[position]
    return out


def aspect_unit(key: str, row: dict, aspect: str, settings: RateSettings, seed: int) -> Unit:
    responses = [c["response"] for c in row["completions"]]
    order = shuffled_order(seed, key, aspect, len(responses))
    messages = rubrics.rating_request(aspect, row["messages"], [responses[i] for i in order])
    sampling = Sampling(settings.temperature, 1.0, settings.max_new_tokens)

    def parse(reply: str) -> dict | None:
        parsed = rubrics.parse_verdict(aspect, reply, len(responses))
        if parsed is None:
            return None
        return {"ratings": [rubrics.annotation(aspect, r) for r in unshuffle(parsed, order)]}

    return Unit(key, f"aspect:{aspect}", lambda attempt: ChatRequest(
        messages, sampling, request_seed(seed, key, aspect, attempt)), parse)


def critique_unit(key: str, row: dict, index: int, settings: RateSettings, seed: int) -> Unit:
    messages = rubrics.critique_request(row["messages"], row["completions"][index]["response"])
    sampling = Sampling(settings.temperature, 1.0, settings.max_new_tokens)

    def parse(reply: str) -> dict | None:
        parsed = rubrics.parse_critique(reply)
        return None if parsed is None else {"critique": parsed[0], "overall_score": parsed[1]}

    return Unit(key, f"critique:{index}", lambda attempt: ChatRequest(
        messages, sampling, request_seed(seed, key, "critique", index, attempt)), parse)


def units_of(key: str, row: dict, settings: RateSettings, seed: int) -> list[Unit]:
    units = [aspect_unit(key, row, aspect, settings, seed) for aspect in settings.aspects]
    if settings.critique:
        units += [critique_unit(key, row, i, settings, seed) for i in range(len(row["completions"]))]
    return units


def ask(judge: Backend, units: list[Unit], retries: int, counts: dict[str, int]) -> list[dict]:
    """Ask the judge; records for the units answered readably or unreadably ``retries + 1`` times.
    Units whose request failed (no reply at all) get no record, so a rerun asks them again."""
    records, pending = [], list(units)
    for attempt in range(retries + 1):
        if not pending:
            break
        replies: list[Reply] = judge.generate([u.request(attempt) for u in pending])
        again = []
        for unit, reply in zip(pending, replies):
            if reply.finish_reason == "error":
                counts["failed"] += 1
                log.warning("rate: the judge's request failed (%s)", reply.error)
                continue
            fields = unit.parse(reply.text)
            if fields is None:
                counts["parse_retries"] += attempt < retries
                again.append(unit)
                continue
            records.append({"key": unit.key, "unit": unit.name, **fields})
        pending = again
    for unit in pending:
        counts["unrated"] += 1
        records.append({"key": unit.key, "unit": unit.name, "ratings": None, "critique": None, "overall_score": None})
    return records


def rate_rows(rows: list[dict], judge: Backend, settings: RateSettings, seed: int, store: StageStore) -> dict[str, int]:
    """Rate ``rows`` (what ``store`` lacks), appending records; this call's counts."""
    keys = [conversation_key(r["messages"]) for r in rows]
    records = {(r["key"], r["unit"]) for r in store.done()}
    counts = {"prompts": len(rows), "resumed": 0, "failed": 0, "parse_retries": 0, "unrated": 0}
    for start in range(0, len(rows), settings.chunk_size):
        units = [u for key, row in zip(keys[start : start + settings.chunk_size], rows[start : start + settings.chunk_size])
                 for u in units_of(key, row, settings, seed)]
        todo = [u for u in units if (u.key, u.name) not in records]
        counts["resumed"] += len(units) - len(todo)
        store.append(ask(judge, todo, settings.retries, counts))
        log.info("rate: %d of %d prompts", min(start + settings.chunk_size, len(rows)), len(rows))
    return counts


def rated_rows(rows: list[dict], settings: RateSettings, records: list[dict]) -> list[dict]:
    """``rows`` (in their order) with every rank's ``records`` filled in."""
    by_unit = {(r["key"], r["unit"]): r for r in records}
    return [rated_row(conversation_key(r["messages"]), r, by_unit, settings) for r in rows]


def run_rate(rows: list[dict], judge: Backend, settings: RateSettings, seed: int, store: StageStore) -> StageOutput:
    """Rate every row (what ``store`` lacks) in this process; the rows with annotations filled, as split ``train``."""
    counts = rate_rows(rows, judge, settings, seed, store)
    return StageOutput({"train": rated_rows(rows, settings, store.done())}, counts)


def rated_row(key: str, row: dict, records: dict, settings: RateSettings) -> dict:
    """``row`` with each completion's ``annotations`` (rated aspects only; None when none is),
    ``fine-grained_score`` (mean of its numeric ratings) and, with critique, ``critique``/``overall_score``."""
    completions = [dict(c) for c in row["completions"]]
    for i, completion in enumerate(completions):
        annotations = {}
        for aspect in settings.aspects:
            ratings = (records.get((key, f"aspect:{aspect}")) or {}).get("ratings")
            if ratings is not None:
                annotations[aspect] = ratings[i]
        numeric = rubrics.numeric_ratings(annotations)
        completion["annotations"] = annotations or None
        completion["fine-grained_score"] = sum(numeric) / len(numeric) if numeric else None
        if settings.critique:
            critique = records.get((key, f"critique:{i}")) or {}
            completion["critique"] = critique.get("critique")
            completion["overall_score"] = critique.get("overall_score")
    return {**row, "completions": completions}
