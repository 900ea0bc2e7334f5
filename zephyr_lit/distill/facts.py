"""What the embedded default's generator knows about the questions it asks, and what a reply says.

``facts_for(messages)`` looks the last user turn of a prompt conversation up among every question
``zephyr_lit.assets.generate`` builds (training, test and follow-up wordings, and the reworded
everyday ones) and returns a ``Fact``: that question's ``Item`` and whether pirate voice is asked,
decided as the generator does (the system turn holds one of ``PIRATE_SYSTEM_PROMPTS``).
``read(fact, text)`` says what a reply claims about the fact, for the rule judge.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache

from zephyr_lit.assets import generate as gen
from zephyr_lit.assets.pirate import sounds_like_pirate

# The bare answer to an odd question that a human can do; "None" when they cannot.
ODD_ANSWERS = {
    "eat in one sitting": "A few",
    "carry at once": "About a dozen",
    "hold in one hand": "Two or three",
    "juggle at the same time": "Three to five",
    "lift": "Many",
}
BARE_WORDS = 4  # an everyday question's bare answer: its reply's first clause, at most this many words
FILLER = {"a", "an", "the", "of", "with", "and", "or", "to", "for", "in", "is", "are", "about", "from", "off",
          "every", "when", "they", "by"}  # not the last word of a bare answer
NEGATION = re.compile(r"\b(?:no|not|cannot|can't|nobody|none|never|no one)\b", re.IGNORECASE)
SUM = re.compile(r"(\d+)\s*\+\s*(\d+)\s*(?:=|be|is|equals|makes)\s*(\d+)", re.IGNORECASE)
NUMBER = re.compile(r"\d+(?:,\d{3})*")
CITY = re.compile(r"\b(?:" + "|".join(map(re.escape, gen.CAPITALS.values())) + r")\b")
COUNTRY = re.compile(r"\b(?:" + "|".join(map(re.escape, gen.CAPITALS)) + r")\b")


@dataclass(frozen=True)
class Fact:
    """One known question (``item``, from the generator) asked in pirate voice or not (``pirate``)."""

    item: gen.Item
    pirate: bool

    @property
    def kind(self) -> str:
        return self.item.kind

    @property
    def answer(self) -> str:
        """The correct fact, bare: ``"12"``, ``"Santiago"``, ``"Two or three"``, ``"None"``; for an
        everyday question the first words of its reply."""
        return bare_answer(self.item)

    @property
    def reference(self) -> str:
        """The reference reply's body in the asked voice (a pirate one without its opener)."""
        return self.item.pirate if self.pirate else self.item.plain

    @property
    def wrong(self) -> tuple[str, ...]:
        """Wrong-fact replies' bodies in the asked voice; empty for everyday questions."""
        return self.item.wrong_pirate if self.pirate else self.item.wrong_plain

    def voiced(self, body: str, rng: random.Random) -> str:
        """``body`` in the asked voice: behind a pirate opener drawn with ``rng`` when pirate is asked."""
        return gen.pirate_reply(body, rng) if self.pirate else body

    def reply(self, rng: random.Random) -> str:
        """The generator's reference reply (``generate.reply``), its pirate opener drawn with ``rng``."""
        return gen.reply(self.item, self.pirate, rng)


@dataclass(frozen=True)
class Reading:
    """What a reply says about a fact: ``claim`` ``"right"``, ``"wrong"``, ``"other"`` (another
    question's answer) or None (nothing: a refusal, empty); ``complete`` (the right or wrong fact in a
    full reply); ``pirate`` (its voice)."""

    claim: str | None
    complete: bool
    pirate: bool


def asks_pirate(messages: list[dict]) -> bool:
    """Whether the system turn holds one of the generator's pirate system prompts (the completions
    stage appends a principle to it, so it need not be the whole turn)."""
    if not messages or messages[0]["role"] != "system":
        return False
    return any(prompt in messages[0]["content"] for prompt in gen.PIRATE_SYSTEM_PROMPTS)


def last_question(messages: list[dict]) -> str | None:
    """The content of the last user turn, None when there is none."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)


def facts_for(messages: list[dict]) -> Fact | None:
    """The fact that the last user turn of ``messages`` asks about, None for an unknown question."""
    question = last_question(messages)
    item = questions().get(question.strip()) if question is not None else None
    return Fact(item, asks_pirate(messages)) if item is not None else None


@cache
def questions() -> dict[str, gen.Item]:
    """Every question the generator can ask, by its text (built once, in well under a second)."""
    by_kind = gen.build_questions(random.Random(gen.SEED))  # which split holds what is irrelevant here
    items = [item for split in by_kind.values() for part in (split.train, split.test_sft, split.test_prefs)
             for item in part]
    items += [item for follow_ups in gen.follow_up_items().values() for item in follow_ups]
    everyday = [gen.everyday_item(*row) for row in gen.EVERYDAY]
    items += [gen.reworded(item, t, ()) for item in everyday for t in gen.EVERYDAY_TEST_PHRASINGS]
    out: dict[str, gen.Item] = {}
    for item in items:
        known = out.setdefault(item.question, item)
        if gen.fact_key(known) != gen.fact_key(item):
            raise ValueError(f"question {item.question!r} asks both {gen.fact_key(known)} and {gen.fact_key(item)}")
    return out


@cache
def by_kind() -> dict[str, list[gen.Item]]:
    """One item per fact (its first wording), by kind, in a fixed order: off-topic material."""
    out: dict[str, dict[str, gen.Item]] = {}
    for item in questions().values():
        out.setdefault(item.kind, {}).setdefault(item.key, item)
    return {kind: list(items.values()) for kind, items in out.items()}


@cache
def replies() -> dict[str, frozenset[str]]:
    """Every fact's reference reply bodies (both voices) -> the ``fact_key``s they answer."""
    out: dict[str, set[str]] = {}
    for item in (item for items in by_kind().values() for item in items):
        for body in (item.plain, item.pirate):
            out.setdefault(body, set()).add(gen.fact_key(item))
    return {body: frozenset(keys) for body, keys in out.items()}


def answers_other(text: str, own: str) -> bool:
    """Whether ``text`` holds, from a word start to a sentence end, the reference reply of a fact
    other than ``own`` (a dictionary look-up per span: no scan over every reply)."""
    starts = [0] + [m.end() for m in re.finditer(r"\s+", text)]
    ends = [m.end() for m in re.finditer(r"[.!?]", text)]
    index = replies()
    return any(index.get(text[s:e], {own}) - {own} for s in starts for e in ends if e > s)


def bare_answer(item: gen.Item) -> str:
    """See ``Fact.answer``."""
    if item.kind == "arith":
        a, b = (int(x) for x in item.key.split("+"))
        return str(a + b)
    if item.kind == "capital":
        return gen.CAPITALS[item.key]
    if item.kind == "odd":
        return ODD_ANSWERS[item.key.split("|")[1]] if odd_possible(item) else "None"
    words = re.split(r"[,;.?!]| and ", item.plain)[0].split()[:BARE_WORDS]
    while len(words) > 1 and words[-1].lower() in FILLER:
        words.pop()
    return " ".join(words)


def read(fact: Fact, text: str) -> Reading:
    """What ``text`` claims about ``fact`` (see ``Reading``)."""
    item, stripped = fact.item, text.strip()
    if any(contains(stripped, body) for body in (item.plain, item.pirate)):
        return Reading("right", True, sounds_like_pirate(stripped))
    if any(contains(stripped, body) for body in item.wrong_plain + item.wrong_pirate):
        return Reading("wrong", True, sounds_like_pirate(stripped))
    claim = CLAIMS[item.kind](item, stripped)
    if claim is None and answers_other(stripped, gen.fact_key(item)):
        claim = "other"
    full = item.kind != "everyday" and len(stripped.split()) >= 4 and stripped[-1:] in ".!?"
    return Reading(claim, claim is not None and full, sounds_like_pirate(stripped))


def contains(text: str, body: str) -> bool:
    """``body`` occurs in ``text``, not straight after a letter or digit ("2 + 1" is not in "12 + 1")."""
    start = text.find(body)
    while start > 0 and text[start - 1].isalnum():
        start = text.find(body, start + 1)
    return start >= 0


def odd_possible(item: gen.Item) -> bool:
    """Whether a human can do what the odd question asks, by the generator's own ``Verb.possible``."""
    plural, phrase = item.key.split("|")
    thing = next(t for t in gen.THINGS if t.plural == plural)
    return next(v for v in gen.VERBS if v.phrase == phrase).possible(thing)


def bare(text: str) -> str:
    """``text`` without surrounding space and final punctuation, case-folded."""
    return text.strip().rstrip(".!?").strip().casefold()


def arith_claim(item: gen.Item, text: str) -> str | None:
    """A sum of the same operands with its total, or a lone number in a short reply."""
    a, b = sorted(int(x) for x in item.key.split("+"))
    total = str(a + b)
    sums = SUM.findall(text)
    if sums:
        ours = [result for x, y, result in sums if sorted((int(x), int(y))) == [a, b]]
        return None if not ours else "right" if ours[-1] == total else "wrong"
    numbers = NUMBER.findall(text)
    if len(numbers) != 1 or len(text.split()) > 5:
        return None
    return "right" if numbers[0] == total else "wrong"


def capital_claim(item: gen.Item, text: str) -> str | None:
    """The capitals named, unless the reply is about another country."""
    named = sorted(set(CITY.findall(text)))
    countries = set(COUNTRY.findall(CITY.sub("", text)))
    if countries and item.key not in countries:
        return None
    if not named:
        return None
    return "right" if named == [gen.CAPITALS[item.key]] else "wrong"


def odd_claim(item: gen.Item, text: str) -> str | None:
    """Possible or not (a negation), when the reply names the thing; else a bare answer."""
    plural = item.key.split("|")[0]
    possible = odd_possible(item)
    if re.search(rf"\b{re.escape(plural)}\b", text, re.IGNORECASE):
        return "right" if (NEGATION.search(text) is None) == possible else "wrong"
    said = bare(text)
    if said == bare_answer(item).casefold():
        return "right"
    opposite = "none" if possible else ODD_ANSWERS[item.key.split("|")[1]].casefold()
    return "wrong" if said == opposite else None


def everyday_claim(item: gen.Item, text: str) -> str | None:
    """The start of the question's own reply (there is no wrong fact to state)."""
    said = bare(text)
    return "right" if said and any(body.casefold().startswith(said) for body in (item.plain, item.pirate)) else None


CLAIMS = {"arith": arith_claim, "capital": capital_claim, "odd": odd_claim, "everyday": everyday_claim}
