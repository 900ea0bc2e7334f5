"""``stage=instructions``: new instructions grown from seed tasks, as in Self-Instruct (Wang et al., 2023).

Request ``i`` shows ``seed_tasks`` seed tasks and up to ``generated_tasks`` generated ones kept so far
(drawn with ``random.Random(request_seed(seed, "instructions", i))``) as a numbered list, and asks for
``per_request`` more (``request_text``). Requests run in rounds of ``chunk_size``; a round is built
from what the rounds before it kept, so its requests do not depend on one another.

A reply that is empty, cut off (``finish_reason == "length"``) or holds no list item is asked again,
with the seed ``request_seed(seed, "instructions", i, attempt)``, up to ``retries`` times; the last one
is recorded anyway (a cut one then proposes nothing: its last line may be torn). A failed request
(``finish_reason == "error"``) gets no record, so a rerun asks it again.

Each candidate of a reply, in order, passes the filter (``rejection``) or is counted under the first
reason it fails: ``multi_line`` (not one line), ``too_short`` / ``too_long`` (words outside
``min_words``..``max_words``), ``not_text`` (it names a medium a text assistant cannot see or make:
an image, picture, photo, graph, diagram, chart, video, audio, screenshot or attachment),
``duplicate`` (equal, up to case and spacing, to a kept one), ``near_duplicate`` (ROUGE-L F above
``max_rouge`` against a kept one). "Kept" means the seeds and every candidate kept before it, those
of the same reply included. The stage stops once ``num_instructions`` new ones are kept (candidates
after that are counted as ``surplus``) or after ``max_requests`` requests (``gave_up`` = 1).

Records are keyed by request index: ``{"request", "attempt", "text", "finish_reason"}``, one append
per round. A rerun replays the records it finds through the filter in request order and asks only
the missing requests, so a killed and rerun stage ends with the same output as an uninterrupted one.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache

from zephyr_lit.assets.generate import prompt_id
from zephyr_lit.distill.store import StageOutput, StageStore
from zephyr_lit.errors import ConfigError, DataError
from zephyr_lit.generation import Backend, ChatRequest, Reply, Sampling, request_seed

log = logging.getLogger(__name__)

COUNTS = ("requests", "proposed", "kept", "too_short", "too_long", "multi_line", "not_text", "duplicate",
          "near_duplicate", "surplus", "unparsed", "retried", "failed", "resumed", "gave_up")


@dataclass
class InstructionsSettings:
    """How many instructions to grow, what each request shows and asks, and how candidates are filtered."""

    num_instructions: int = 200  # stop once this many new instructions are kept
    seed_tasks: int = 6  # seed tasks shown per request
    generated_tasks: int = 2  # kept generated tasks shown per request, once there are any
    per_request: int = 8  # new instructions each request asks for
    max_rouge: float = 0.7  # drop a candidate whose ROUGE-L F against anything kept is above this
    min_words: int = 3
    max_words: int = 150
    max_requests: int = 1000  # give up after this many requests (counted as gave_up)
    chunk_size: int = 8  # requests per round
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    retries: int = 2  # extra asks after an empty, cut-off or unreadable reply


def instructions_problems(settings: InstructionsSettings) -> list[str]:
    """Every bad value, one line each, naming ``instructions.<key>=<value>``."""
    s, problems = settings, []
    for key in ("num_instructions", "seed_tasks", "per_request", "min_words", "max_requests", "chunk_size",
                "max_new_tokens"):
        if getattr(s, key) < 1:
            problems.append(f"instructions.{key}={getattr(s, key)} must be at least 1")
    for key in ("generated_tasks", "retries", "temperature"):
        if getattr(s, key) < 0:
            problems.append(f"instructions.{key}={getattr(s, key)} must be at least 0")
    if not 0 < s.max_rouge <= 1:
        problems.append(f"instructions.max_rouge={s.max_rouge} must be in (0, 1]: a ROUGE-L F-measure")
    if not 0 < s.top_p <= 1:
        problems.append(f"instructions.top_p={s.top_p} must be in (0, 1]")
    if s.max_words < s.min_words:
        problems.append(f"instructions.max_words={s.max_words} is below instructions.min_words={s.min_words}")
    if 0 < s.max_requests * s.per_request < s.num_instructions:
        problems.append(f"instructions.num_instructions={s.num_instructions} can never be reached: "
                        f"max_requests={s.max_requests} requests of per_request={s.per_request} propose fewer")
    return problems


OPENING = "Here are some tasks that people have given an AI assistant:"
ASK = ("Write {n} new tasks of your own for the same assistant. Make each one differ from the tasks above "
       "and from the others you write: another topic, another kind of request (a question, a piece of "
       "writing, advice, an explanation, a puzzle), another wording. Every task must fit on one line and be "
       "answerable in text alone. Reply with the numbered list only, from 1 to {n}, one task per line.")
ASK_COUNT = re.compile(r"^Write (\d+) new tasks of your own")
NUMBERED = re.compile(r"^(\d+)\. (.*)$")


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) as one space, stripped."""
    return " ".join(text.split())


def request_text(shown: Sequence[str], n: int) -> str:
    """The user turn that shows ``shown`` (numbered, one line each) and asks for ``n`` new tasks."""
    listed = "\n".join(f"{k}. {one_line(task)}" for k, task in enumerate(shown, 1))
    return f"{OPENING}\n\n{listed}\n\n{ASK.format(n=n)}"


def read_request(text: str) -> tuple[list[str], int]:
    """``request_text`` read back: (the tasks shown, how many are asked for). ValueError otherwise."""
    lines = text.split("\n")
    if not lines or lines[0] != OPENING:
        raise ValueError("it does not open with the instructions stage's request")
    asked = ASK_COUNT.match(lines[-1])
    if asked is None:
        raise ValueError("it does not end with the ask for new tasks")
    shown = [NUMBERED.match(line) for line in lines[1:-1] if line]
    if any(m is None or int(m.group(1)) != k for k, m in enumerate(shown, 1)):
        raise ValueError("its tasks are not a list numbered 1, 2, ...")
    return [m.group(2) for m in shown], int(asked.group(1))


def shown_tasks(seeds: Sequence[str], generated: Sequence[str], settings: InstructionsSettings, seed: int,
                index: int) -> list[str]:
    """The tasks request ``index`` shows: seeds and kept generated ones, drawn and shuffled by its key."""
    rng = random.Random(request_seed(seed, "instructions", index))
    shown = rng.sample(list(seeds), min(settings.seed_tasks, len(seeds)))
    shown += rng.sample(list(generated), min(settings.generated_tasks, len(generated)))
    rng.shuffle(shown)
    return shown


ITEM = re.compile(r"^\s*(?:\*\*)?(?:\(?\d{1,3}[.):]|[-*•+])(?:\*\*)?\s+(.*)$")
MEDIA = re.compile(r"\b(?:image|picture|photo|photograph|graph|diagram|chart|video|audio|screenshot|attachment)s?\b"
                   r"|\battached\b", re.IGNORECASE)


def clean_item(text: str) -> str:
    """A list item's text without markdown bold, surrounding quotes and spaces."""
    text = text.replace("**", "").strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def parse_instructions(reply: str) -> list[str]:
    """Candidates of a reply: its list items (``1.``, ``1)``, ``(1)``, ``-``, ``*``, ``•``), numbering
    and bold stripped; other lines (a preamble, notes) are ignored. A reply without list items gives
    each non-blank line. Either way lines ending with ``:`` (preambles, headings) are left out."""
    lines = [line for line in reply.splitlines() if line.strip()]
    items = [m.group(1) for m in map(ITEM.match, lines) if m is not None]
    texts = items if items else lines
    return [t for t in map(clean_item, texts) if t and not t.endswith(":")]


@cache
def rouge() -> tuple[object, Callable[[str], list[str]]]:
    """rouge-score's ROUGE-L scorer (no stemming) and the tokenizer it uses."""
    try:
        from rouge_score import rouge_scorer, tokenize
    except ImportError:
        raise ConfigError("stage=instructions needs the rouge-score package: pip install rouge-score") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False), lambda text: tokenize.tokenize(text, None)


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure of two texts (symmetric): 2 LCS / (len a + len b) over rouge-score's tokens."""
    return rouge()[0].score(a, b)["rougeL"].fmeasure


def normalized(text: str) -> str:
    """Case- and space-insensitive form, for exact duplicates."""
    return one_line(text).casefold()


@dataclass
class Kept:
    """Every instruction kept so far, seeds first, with what the filter needs of each; ``new`` holds
    the generated ones as (text, request index)."""

    texts: list[str] = field(default_factory=list)
    normals: set[str] = field(default_factory=set)
    bags: list[Counter] = field(default_factory=list)  # rouge tokens of each text, counted
    lengths: list[int] = field(default_factory=list)  # rouge tokens of each text
    new: list[tuple[str, int]] = field(default_factory=list)

    def add(self, text: str, request: int | None = None) -> None:
        self.texts.append(text)
        self.normals.add(normalized(text))
        tokens = rouge()[1](text)
        self.bags.append(Counter(tokens))
        self.lengths.append(len(tokens))
        if request is not None:
            self.new.append((text, request))


def near_duplicate(candidate: str, kept: Kept, max_rouge: float) -> bool:
    """Whether ROUGE-L F of ``candidate`` against some kept text is above ``max_rouge``. A pair whose
    shared tokens bound F (LCS <= shared tokens) clearly below ``max_rouge`` is not scored."""
    bag = Counter(rouge()[1](candidate))
    size = sum(bag.values())
    for text, other, length in zip(kept.texts, kept.bags, kept.lengths):
        shared = sum(min(n, other[token]) for token, n in bag.items() if token in other)
        if size + length == 0 or 2 * shared / (size + length) <= max_rouge - 1e-9:
            continue
        if rouge_l(text, candidate) > max_rouge:
            return True
    return False


def rejection(candidate: str, kept: Kept, settings: InstructionsSettings) -> str | None:
    """The first reason (module docstring) ``candidate`` is dropped, None when it is kept."""
    words = len(candidate.split())
    if "\n" in candidate.strip():
        return "multi_line"
    if words < settings.min_words:
        return "too_short"
    if words > settings.max_words:
        return "too_long"
    if MEDIA.search(candidate):
        return "not_text"
    if normalized(candidate) in kept.normals:
        return "duplicate"
    if near_duplicate(candidate, kept, settings.max_rouge):
        return "near_duplicate"
    return None


def take(record: dict, kept: Kept, settings: InstructionsSettings, counts: dict[str, int]) -> None:
    """Pass a record's candidates (none from a cut-off reply) through the filter, keeping the good
    ones, until the target is met."""
    items = [] if record.get("finish_reason") == "length" else parse_instructions(record["text"])
    counts["unparsed"] += not items
    counts["retried"] += record["attempt"]
    for text in items:
        counts["proposed"] += 1
        if len(kept.new) >= settings.num_instructions:
            counts["surplus"] += 1
            continue
        reason = rejection(text, kept, settings)
        if reason is None:
            kept.add(text, record["request"])
        else:
            counts[reason] += 1


def ask(writer: Backend, todo: list[int], build: Callable[[int, int], ChatRequest], retries: int,
        counts: dict[str, int]) -> list[dict]:
    """Records of the requests ``todo``, each asked again while its reply is unusable (at most
    ``retries`` times); failed requests get none. In request order."""
    records, pending = [], list(todo)
    for attempt in range(retries + 1):
        if not pending:
            break
        replies: list[Reply] = writer.generate([build(i, attempt) for i in pending])
        again = []
        for index, reply in zip(pending, replies):
            if reply.finish_reason == "error":
                counts["failed"] += 1
                log.warning("instructions: request %d failed (%s)", index, reply.error)
                continue
            if (reply.finish_reason == "stop" and parse_instructions(reply.text)) or attempt == retries:
                records.append({"request": index, "attempt": attempt, "text": reply.text,
                                "finish_reason": reply.finish_reason})
            else:
                again.append(index)
        pending = again
    return sorted(records, key=lambda r: r["request"])


def run_instructions(seeds: list[str], writer: Backend, settings: InstructionsSettings, seed: int,
                     store: StageStore) -> StageOutput:
    """Grow new instructions from ``seeds`` (module docstring); the new ones as split ``train`` and as
    ``questions.txt`` (one per line), in the order kept."""
    if not seeds:
        raise DataError("stage=instructions: the input has no seed tasks; give a file or dataset of questions")
    shown_seeds = [one_line(s) for s in seeds]
    kept = Kept()
    for text in shown_seeds:
        kept.add(text)
    done: dict[int, dict] = {}
    for record in store.done():
        done.setdefault(record["request"], record)
    counts = dict.fromkeys(COUNTS, 0)
    sampling = Sampling(settings.temperature, settings.top_p, settings.max_new_tokens)
    for start in range(0, settings.max_requests, settings.chunk_size):
        indices = range(start, min(start + settings.chunk_size, settings.max_requests))
        generated = [text for text, _ in kept.new]  # the round sees what the rounds before it kept

        def build(index: int, attempt: int) -> ChatRequest:
            shown = shown_tasks(shown_seeds, generated, settings, seed, index)
            messages = [{"role": "user", "content": request_text(shown, settings.per_request)}]
            return ChatRequest(messages, sampling, request_seed(seed, "instructions", index, attempt))

        todo = [i for i in indices if i not in done]
        counts["resumed"] += len(indices) - len(todo)
        fresh = ask(writer, todo, build, settings.retries, counts)
        store.append(fresh)
        records = {**{i: done[i] for i in indices if i in done}, **{r["request"]: r for r in fresh}}
        counts["requests"] += len(indices)
        for index in indices:
            if index in records:
                take(records[index], kept, settings, counts)
        log.info("instructions: %d of %d kept after %d requests", len(kept.new), settings.num_instructions,
                 indices.stop)
        if len(kept.new) >= settings.num_instructions:
            break
    counts["kept"] = len(kept.new)
    counts["gave_up"] = int(len(kept.new) < settings.num_instructions)
    rows = [{"instruction": text, "prompt_id": prompt_id(text), "source": "self-instruct", "request": index}
            for text, index in kept.new]
    return StageOutput(splits={"train": rows}, counts=counts,
                       files={"questions.txt": "".join(text + "\n" for text, _ in kept.new)})
