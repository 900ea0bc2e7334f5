"""Offline, deterministic backends for the embedded default: a pool of scripted personas and a rule judge.

Both answer from what the generator knows (``facts.py``); a reply depends only on (persona, messages,
seed), never on the batch. A question the generator never asks gets ``Reply("", "error", ...)``
from either (the stages count it; ``rate`` asks again on a rerun), as does a judge request that
``rubrics`` cannot read back. ``N/A`` is not used: it means "the aspect does not apply", not "the
judge does not know", and the typed aspects do not offer it.

Personas (``ScriptedBackend(persona)``), in the asked voice unless said otherwise:

- ``courteous``: the generator's reference reply (a pirate one behind an opener drawn with the seed);
- ``terse``: the bare correct fact, no voice, no sentence: ``"12."``, ``"Santiago."``, ``"None."``;
- ``wrong_fact``: a wrong fact drawn with the seed; an everyday question (no wrong fact) gets another
  everyday question's reference reply instead;
- ``rude``: a dismissive non-answer drawn with the seed (``RUDE``), plain voice;
- ``off_topic``: the reference reply of a question of another kind, drawn with the seed.

The rule judge (``RuleJudge``) also grades the evaluation prompts of the shipped judge prompt file
(``assets/data/eval/judge_prompts.jsonl``, read back with ``judge_templates.read_back``): a 1-10 grade
``[[N]]`` of the last answer (turn 2 for a multi-turn prompt) as the critique's overall score below, and
for a comparison ``[[A]]``, ``[[B]]`` or ``[[C]]`` (a tie) by the two answers' overall scores.

The rule judge reads each text with ``facts.read`` and rates it by this table
(``RULES``); "voice" is pirate or plain, as the system prompt asks:

=============================================  ==  =======  ==============  ==============
the text                                       IF  honesty  truthfulness    helpfulness
=============================================  ==  =======  ==============  ==============
right fact, full reply                         5   5        5 (type 0)      5 (types 1,2,3)
right fact, bare (no full sentence)            4   5        5 (type 0)      3 (types 1,3)
wrong fact, stated with confidence             3   1        1 (type 1)      1 (types 1,3)
another question's answer                      1   3        2 (type 2)      1 (type 3)
no answer (refusal, rudeness, empty, other)    1   3        5 (type 0)      1 (type 0)
=============================================  ==  =======  ==============  ==============

Voice not as asked: instruction following 2 lower (at least 1). The critique's overall score is
``round(1 + 9 * (mean - 1) / 4)`` of the four ratings' mean (1-10), so it ranks texts as the mean does.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from zephyr_lit.assets import asset_path
from zephyr_lit.assets import generate as gen
from zephyr_lit.assets.eval_sets import JUDGE_PROMPTS
from zephyr_lit.distill import rubrics
from zephyr_lit.distill.facts import Fact, Reading, by_kind, facts_for, last_question, read
from zephyr_lit.distill.judge_templates import (TIE, JudgePrompt, format_choice, format_rating, load_judge_prompts,
                                                read_back)
from zephyr_lit.distill.rubric_text import TYPES
from zephyr_lit.errors import ConfigError
from zephyr_lit.generation import ChatRequest, Reply

RUDE = (
    "Look it up yourself.",
    "Why are you asking me? Figure it out.",
    "I have better things to do than answer that.",
    "Not my problem. Ask someone else.",
)


def courteous(fact: Fact, rng: random.Random) -> str:
    return fact.reply(rng)


def terse(fact: Fact, rng: random.Random) -> str:
    return f"{fact.answer}."


def wrong_fact(fact: Fact, rng: random.Random) -> str:
    if not fact.wrong:
        return another(fact, rng, [fact.kind])
    return fact.voiced(rng.choice(fact.wrong), rng)


def rude(fact: Fact, rng: random.Random) -> str:
    return rng.choice(RUDE)


def off_topic(fact: Fact, rng: random.Random) -> str:
    return another(fact, rng, sorted(kind for kind in by_kind() if kind != fact.kind))


def another(fact: Fact, rng: random.Random, kinds: list[str]) -> str:
    """The reference reply, in ``fact``'s voice, of another fact of one of ``kinds``."""
    others = [item for item in by_kind()[rng.choice(kinds)] if item.key != fact.item.key]
    return Fact(rng.choice(others), fact.pirate).reply(rng)


PERSONAS = {"courteous": courteous, "terse": terse, "wrong_fact": wrong_fact, "rude": rude, "off_topic": off_topic}


def unknown(who: str, messages: Sequence[dict]) -> Reply:
    return Reply("", "error", error=f"{who}: unknown question {last_question(list(messages))!r}: "
                                   "not one the embedded generator asks")


class ScriptedBackend:
    """Answers the embedded default's prompts as ``persona`` would (see the module docstring)."""

    def __init__(self, persona: str, name: str | None = None) -> None:
        if persona not in PERSONAS:
            raise ConfigError(f"scripted backend persona={persona!r}: use one of {', '.join(PERSONAS)}")
        self.persona, self.name = persona, name or f"scripted-{persona}"

    def generate(self, requests: Sequence[ChatRequest]) -> list[Reply]:
        return [self.answer(r) for r in requests]

    def answer(self, request: ChatRequest) -> Reply:
        fact = facts_for(list(request.messages))
        if fact is None:
            return unknown(self.name, request.messages)
        return Reply(PERSONAS[self.persona](fact, random.Random(request.seed)))


@dataclass(frozen=True)
class Rule:
    """One row of the rule table: a rating per aspect, the typed aspects' type codes, and what it says."""

    ratings: dict[str, int]
    types: dict[str, tuple[str, ...]]
    says: str


RULES = {
    "full": Rule(dict(instruction_following=5, honesty=5, truthfulness=5, helpfulness=5),
                 dict(truthfulness=("0",), helpfulness=("1", "2", "3")),
                 "It gives the right answer ({answer}) in full"),
    "bare": Rule(dict(instruction_following=4, honesty=5, truthfulness=5, helpfulness=3),
                 dict(truthfulness=("0",), helpfulness=("1", "3")),
                 "It gives the right answer ({answer}), but bare, not as a full reply"),
    "wrong": Rule(dict(instruction_following=3, honesty=1, truthfulness=1, helpfulness=1),
                  dict(truthfulness=("1",), helpfulness=("1", "3")),
                  "It states a wrong answer with full confidence (the right one is {answer})"),
    "other": Rule(dict(instruction_following=1, honesty=3, truthfulness=2, helpfulness=1),
                  dict(truthfulness=("2",), helpfulness=("3",)), "It answers another question, not the one asked"),
    "none": Rule(dict(instruction_following=1, honesty=3, truthfulness=5, helpfulness=1),
                 dict(truthfulness=("0",), helpfulness=("0",)), "It gives no answer at all"),
}
ADVICE = {"full": "", "bare": "Answer in a full sentence.", "wrong": "Give the right answer: {answer}.",
          "other": "Answer the question that was asked.", "none": "Answer the question."}


@dataclass(frozen=True)
class Judgement:
    """How the rule table rates one text."""

    rule: str
    ratings: dict[str, int]
    reason: str  # what the text does, in the voice it does it
    advice: str  # what a better reply would change; empty when nothing

    @property
    def mean(self) -> float:
        return sum(self.ratings.values()) / len(self.ratings)

    @property
    def overall(self) -> int:
        """The critique's 1-10 score: the mean rating mapped linearly onto 1-10, rounded."""
        return round(1 + 9 * (self.mean - 1) / 4)


def rule_of(reading: Reading) -> str:
    if reading.claim == "right":
        return "full" if reading.complete else "bare"
    return reading.claim or "none"


def judge(fact: Fact, text: str) -> Judgement:
    """Rate ``text`` as an answer to ``fact`` by the rule table."""
    reading = read(fact, text)
    name = rule_of(reading)
    rule, ratings = RULES[name], dict(RULES[name].ratings)
    asked, used = ("pirate" if fact.pirate else "plain"), ("pirate" if reading.pirate else "plain")
    advice = [ADVICE[name].format(answer=fact.answer)]
    if reading.pirate == fact.pirate:
        voice = f"in {used} voice, as asked"
    else:
        voice = f"in {used} voice, though {asked} voice was asked"
        ratings["instruction_following"] = max(1, ratings["instruction_following"] - 2)
        advice.append(f"Answer in {asked} voice, as the system prompt asks.")
    reason = f"{rule.says.format(answer=fact.answer)}, {voice}."
    return Judgement(name, ratings, reason, " ".join(a for a in advice if a))


def aspect_rating(aspect: str, judged: Judgement) -> rubrics.AspectRating:
    rating = str(judged.ratings[aspect])
    if aspect not in rubrics.TYPED_ASPECTS:
        return rubrics.AspectRating(rating, judged.reason)
    types = RULES[judged.rule].types[aspect]
    names = "; ".join(TYPES[aspect][code][0] for code in types)
    return rubrics.AspectRating(rating, f"Types {', '.join(types)} ({names}). {judged.reason}", types, judged.reason)


class RuleJudge:
    """A judge backend that rates by the rule table (module docstring), replying in the rubric's own
    formats so that ``rubrics.parse_verdict`` / ``parse_critique`` read it as they would an LLM's."""

    def __init__(self, name: str = "rule") -> None:
        self.name = name

    def generate(self, requests: Sequence[ChatRequest]) -> list[Reply]:
        return [self.answer(list(r.messages)) for r in requests]

    def answer(self, messages: list[dict]) -> Reply:
        try:
            if rubrics.is_critique_request(messages):
                prompt, text = rubrics.read_critique_request(messages)
                aspect, texts = None, [text]
            else:
                aspect, prompt, texts = rubrics.read_rating_request(messages)
        except ValueError as e:
            graded = grade_eval_request(messages, self.name)
            why = f"{self.name}: not a rating or critique request ({e}), nor an evaluation prompt it knows"
            return graded or Reply("", "error", error=why)
        fact = facts_for(prompt)
        if fact is None:
            return unknown(self.name, prompt)
        judged = [judge(fact, text) for text in texts]
        if aspect is None:
            critique = f"{judged[0].reason} {judged[0].advice or 'Nothing to change.'}"
            return Reply(rubrics.format_critique(critique, judged[0].overall))
        return Reply(rubrics.format_verdict(aspect, [aspect_rating(aspect, j) for j in judged]))


@cache
def eval_prompts() -> tuple[JudgePrompt, ...]:
    return tuple(load_judge_prompts(asset_path(JUDGE_PROMPTS)).values())


def grade_eval_request(messages: list[dict], who: str) -> Reply | None:
    """The rule judge's reply to a prompt of the shipped judge prompt file; None for any other text."""
    for prompt in eval_prompts():
        fields = read_back(prompt, messages)
        if fields is None:
            continue
        turn = "_2" if "answer_2" in fields else ""  # a multi-turn prompt grades the second answer
        question = [{"role": "user", "content": fields[f"question{turn}"]}]
        fact = facts_for(question)
        if fact is None:
            return unknown(who, question)
        if prompt.type == "pairwise":
            a, b = judge(fact, fields["answer_a"]), judge(fact, fields["answer_b"])
            choice = "A" if a.overall > b.overall else "B" if b.overall > a.overall else TIE
            return Reply(format_choice(f"Reply A: {a.reason} Reply B: {b.reason}", choice))
        graded = judge(fact, fields[f"answer{turn}"])
        return Reply(format_rating(f"{graded.reason} {graded.advice}".strip(), graded.overall))
    return None


class ScriptedUser:
    """Plays the user of the embedded default's dialogues (``stage=dialogues``). It reads the flipped
    conversation (``dialogues.user_view``: the questions asked so far are its "assistant" turns) and asks
    a follow-up of the opening question's kind, drawn with the request's seed among those not yet
    asked: a follow-up wording (``generate.follow_up_items``) for sums and capitals, another question
    of the kind otherwise. Every question it asks is one the ``courteous`` persona can answer."""

    def __init__(self, name: str = "scripted-user") -> None:
        self.name = name

    def generate(self, requests: Sequence[ChatRequest]) -> list[Reply]:
        return [self.ask(r) for r in requests]

    def ask(self, request: ChatRequest) -> Reply:
        asked = [m["content"] for m in request.messages if m["role"] == "assistant"]
        fact = facts_for([{"role": "user", "content": asked[0]}]) if asked else None
        if fact is None:
            return unknown(self.name, [{"role": "user", "content": asked[0] if asked else ""}])
        pool = follow_ups().get(fact.kind) or by_kind()[fact.kind]
        fresh = [item.question for item in pool if item.question not in asked]
        return Reply(random.Random(request.seed).choice(fresh))


@cache
def follow_ups() -> dict[str, list]:
    return gen.follow_up_items()
