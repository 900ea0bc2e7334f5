"""``stage=binarize``'s logic: rated UltraFeedback rows -> the ``HuggingFaceH4/ultrafeedback_binarized`` splits.

Pure functions; reading, writing and resuming are the app's. The rules:

- **Prompt conversation**: the row's ``messages`` (ours: may hold a system turn and earlier turns, ends
  with a user turn), else ``[{"role": "user", "content": instruction}]`` (rows from the hub).
- **Score** (``completion_score``): ``mean`` = mean of the numeric ``Rating`` of the four aspects, "N/A"
  left out (the paper); ``overall`` = ``overall_score`` (HuggingFaceH4's build script). ``None`` = unrated.
  A completion with an empty or whitespace response is left out too (counted), whatever its score.
- **Pair**: chosen = the best-scored completion; rejected = uniformly one of the *other* completions
  (``random``) or the lowest-scored (``lowest``). ``ties=keep`` lets the rejected score as high as the
  chosen (the published set); ``ties=drop`` draws it only from strictly lower scores and drops the prompt
  when there is none. Ties (for best, or for lowest) are broken by the same seeded draw.
- **Randomness**: every draw of a row comes from ``random.Random`` seeded by sha256(f"{seed}:{key}"), key =
  sha256 of the prompt conversation's canonical JSON (not the first user text: one question asked with and
  without a system prompt is two prompts). So a row's pair does not depend on row order or on the other
  rows: a resumed or sharded run gives the same pairs. Draw order: chosen among the best, then rejected.
- **Split**: the ``test_size`` keys with the smallest sha256(f"{seed}:test:{key}") go to test_prefs, the
  rest to train_prefs; both keep input order. test_sft/train_sft are the same rows; the gen splits are the
  same rows and columns with ``messages`` cut to the prompt conversation (as the hub's gen splits, which
  keep chosen/rejected: their rows are smaller by about one reply).
- Duplicated prompt conversations: the first is kept. ``score=overall`` on an input in which no
  completion has an ``overall_score`` is a ``DataError`` (the field was never made); a row where only
  some completions have one is fine (the others are unrated), a row where none has one is skipped.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any

from zephyr_lit.assets.generate import prompt_id  # sha256 hex of the prompt text, as ultrachat's
from zephyr_lit.distill.inputs import check_turns, conversation_key
from zephyr_lit.distill.rubrics import ASPECTS
from zephyr_lit.errors import ConfigError, DataError

SCORES = ("mean", "overall")
REJECTED = ("random", "lowest")
TIES = ("keep", "drop")
SPLITS = ("train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen", "test_gen")
# Counts of ``Binarized.counts``. Rows: rows_in = duplicates + skipped_unrated + dropped_ties + pairs.
COUNTS = {
    "rows_in": "input rows",
    "duplicates": "rows whose prompt conversation repeats an earlier row's (left out, the first kept)",
    "unrated_completions": "completions with no score (mean: no numeric Rating; overall: no overall_score)",
    "empty_responses": "completions left out for an empty or whitespace response",
    "skipped_unrated": "prompts with fewer than 2 rated completions (skipped)",
    "dropped_ties": "prompts with no completion scored strictly below the chosen (ties=drop only)",
    "tied_pairs": "pairs kept whose rejected scores as high as the chosen (ties=keep only)",
    "pairs": "pairs made (rows of train_prefs + test_prefs)",
    "train": "rows of train_prefs (= train_sft = train_gen)",
    "test": "rows of test_prefs (= test_sft = test_gen)",
}


@dataclass(frozen=True)
class BinarizeOptions:
    score: str = "mean"
    """``mean``: mean of the numeric Ratings of the four aspects (the paper); ``overall``: ``overall_score``."""
    rejected: str = "random"
    """``random``: uniformly among the other completions; ``lowest``: the lowest-scored one."""
    ties: str = "keep"
    """``keep``: the rejected may score as high as the chosen; ``drop``: only strictly lower, else drop the prompt."""
    test_size: int = 100
    """Rows to test_prefs (and test_sft, test_gen); 0 for none."""


@dataclass
class Binarized:
    splits: dict[str, list[dict]]
    """All six ``SPLITS``, rows in the ``HuggingFaceH4/ultrafeedback_binarized`` schema."""
    counts: dict[str, int]
    """Every key of ``COUNTS``."""


@dataclass(frozen=True)
class _Rated:
    index: int  # position in the row's completions
    response: str
    score: float


def binarize_problems(options: BinarizeOptions) -> list[str]:
    """Every invalid option, one ``binarize.key=value: what is wrong`` line each."""
    problems = [f"binarize.{key}={getattr(options, key)!r}: must be one of {', '.join(allowed)}"
                for key, allowed in (("score", SCORES), ("rejected", REJECTED), ("ties", TIES))
                if getattr(options, key) not in allowed]
    size = options.test_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        problems.append(f"binarize.test_size={size!r}: must be an integer >= 0")
    return problems


def _number(value: Any) -> float | None:
    """``value`` as a finite float (numbers and numeric strings such as ``"4"``), else ``None`` ("N/A")."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def completion_score(completion: dict, score: str) -> float | None:
    """The completion's score under ``score`` (see ``BinarizeOptions.score``); ``None`` when unrated."""
    if score == "overall":
        return _number(completion.get("overall_score"))
    if score != "mean":
        raise ValueError(f"score={score!r}: must be one of {', '.join(SCORES)}")
    annotations = completion.get("annotations") or {}
    ratings = [_number(aspect.get("Rating")) for name in ASPECTS
               if isinstance(aspect := annotations.get(name), dict)]
    numeric = [r for r in ratings if r is not None]
    return sum(numeric) / len(numeric) if numeric else None


def _hash(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest(), 16)


def _prompt_conversation(row: dict, at: str) -> list[dict]:
    """The prompt conversation as ``{role, content}`` dicts ending with a user turn; ``DataError`` otherwise."""
    messages = row.get("messages")
    if messages is None:
        if not isinstance(row.get("instruction"), str):
            raise DataError(f"{at}: field 'instruction' must be a string when the row has no 'messages'",
                            field="instruction", reason="missing")
        return [{"role": "user", "content": row["instruction"]}]
    messages = check_turns(messages, at, "messages")
    if messages[-1]["role"] != "user":
        raise DataError(f"{at}: field 'messages' must end with a user turn (the prompt), ends with "
                        f"{messages[-1]['role']!r}", field="messages", reason="not_a_prompt")
    return messages


def _completions(row: dict, at: str) -> list[dict]:
    completions = row.get("completions")
    if not isinstance(completions, list) or not all(isinstance(c, dict) for c in completions):
        raise DataError(f"{at}: field 'completions' must be a list of completion dicts, got {completions!r:.80}",
                        field="completions", reason="not_a_list")
    return completions


def _rated(completions: list[dict], score: str, counts: dict[str, int]) -> list[_Rated]:
    """The completions that take part: rated, with a non-blank response."""
    rated = []
    for i, completion in enumerate(completions):
        value, response = completion_score(completion, score), completion.get("response")
        if not isinstance(response, str) or not response.strip():
            counts["empty_responses"] += 1
        elif value is None:
            counts["unrated_completions"] += 1
        else:
            rated.append(_Rated(i, response, value))
    return rated


def _pick(rated: list[_Rated], options: BinarizeOptions, rng: random.Random) -> tuple[_Rated, _Rated] | None:
    """(chosen, rejected) by the rules above; ``None`` when ``ties=drop`` leaves no rejected."""
    best = max(r.score for r in rated)
    chosen = rng.choice([r for r in rated if r.score == best])
    pool = [r for r in rated if r is not chosen and (options.ties == "keep" or r.score < best)]
    if not pool:
        return None
    if options.rejected == "lowest":
        lowest = min(r.score for r in pool)
        pool = [r for r in pool if r.score == lowest]
    return chosen, rng.choice(pool)


def _check_overall(rows: list[dict], source: str) -> None:
    """``score=overall`` needs ``overall_score`` somewhere; none at all means it was never made."""
    with_completions = [i for i, row in enumerate(rows) if isinstance(c := row.get("completions"), list) and c]
    if with_completions and not any(_number(c.get("overall_score")) is not None for row in rows
                                    for c in row.get("completions") or [] if isinstance(c, dict)):
        raise DataError(
            f"{source} row {with_completions[0]}: field 'completions[0].overall_score' is missing, and so is every "
            "other completion's: binarize.score=overall needs the critique's overall_score; run rate with "
            "rate.critique=true, or use binarize.score=mean", field="completions[0].overall_score", reason="missing")


def _pair_row(conversation: list[dict], chosen: _Rated, rejected: _Rated) -> dict:
    """A row in the ultrafeedback_binarized schema; ``prompt`` is the first user turn, as in ultrachat."""
    prompt = next(m["content"] for m in conversation if m["role"] == "user")
    chosen_messages = [*conversation, {"role": "assistant", "content": chosen.response}]
    return {"prompt": prompt, "prompt_id": prompt_id(prompt), "chosen": chosen_messages,
            "rejected": [*conversation, {"role": "assistant", "content": rejected.response}],
            "messages": list(chosen_messages), "score_chosen": chosen.score, "score_rejected": rejected.score}


def _splits(pairs: list[tuple[str, dict]], test_size: int, seed: int, source: str, counts: dict[str, int]) -> dict:
    if test_size > len(pairs):
        raise DataError(f"{source}: binarize.test_size={test_size} but only {len(pairs)} pairs were made from "
                        f"{counts['rows_in']} rows (skipped_unrated={counts['skipped_unrated']}, dropped_ties="
                        f"{counts['dropped_ties']}, duplicates={counts['duplicates']}); lower binarize.test_size")
    test_keys = set(sorted((key for key, _ in pairs), key=lambda k: _hash(seed, f"test:{k}"))[:test_size])
    test = [row for key, row in pairs if key in test_keys]
    train = [row for key, row in pairs if key not in test_keys]
    counts.update(train=len(train), test=len(test))
    out = {}
    for part, rows in (("train", train), ("test", test)):
        # gen: the same row, messages without the final assistant turn (the prompt to generate from).
        out |= {f"{part}_prefs": rows, f"{part}_sft": [dict(r) for r in rows],
                f"{part}_gen": [{**r, "messages": r["messages"][:-1]} for r in rows]}
    return {name: out[name] for name in SPLITS}


def binarize(rows: list[dict], options: BinarizeOptions, seed: int, source: str = "input") -> Binarized:
    """Rated UltraFeedback rows -> the six splits and the ``COUNTS``; ``source`` names the input in errors."""
    if problems := binarize_problems(options):
        raise ConfigError("invalid config: " + "; ".join(problems))
    if options.score == "overall":
        _check_overall(rows, source)
    counts = dict.fromkeys(COUNTS, 0)
    counts["rows_in"] = len(rows)
    seen: set[str] = set()
    pairs: list[tuple[str, dict]] = []
    for i, row in enumerate(rows):
        at = f"{source} row {i}"
        conversation = _prompt_conversation(row, at)
        completions = _completions(row, at)
        key = conversation_key(conversation)
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        rated = _rated(completions, options.score, counts)
        if len(rated) < 2:
            counts["skipped_unrated"] += 1
            continue
        picked = _pick(rated, options, random.Random(_hash(seed, key)))
        if picked is None:
            counts["dropped_ties"] += 1
            continue
        counts["tied_pairs"] += int(picked[1].score >= picked[0].score)
        pairs.append((key, _pair_row(conversation, *picked)))
    counts["pairs"] = len(pairs)
    return Binarized(_splits(pairs, options.test_size, seed, source, counts), counts)
