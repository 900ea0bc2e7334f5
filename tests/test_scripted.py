"""The offline AI-feedback backends: the generator's facts, the scripted personas and the rule judge."""

from __future__ import annotations

import json
import random
import time

import pytest

from zephyr_lit.assets import generate as gen
from zephyr_lit.assets.pirate import sounds_like_pirate
from zephyr_lit.distill import facts, rubrics
from zephyr_lit.distill.scripted import PERSONAS, RuleJudge, ScriptedBackend, judge
from zephyr_lit.errors import ConfigError
from zephyr_lit.generation import ChatRequest, request_seed

PIRATE = "You are a friendly chatbot who always responds in the style of a pirate"
SUM_PLAIN = [{"role": "user", "content": "What is 7 + 5?"}]
CAPITAL_PIRATE = [{"role": "system", "content": PIRATE},
                  {"role": "user", "content": "Do you know the capital of Chile?"}]
EVERYDAY_PLAIN = [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Why is the sky blue?"}]
# The completions stage appends a principle to the prompt's own system prompt.
EVERYDAY_PIRATE = [{"role": "system", "content": f"{PIRATE}\n\nYou are a truthful assistant."},
                   {"role": "user", "content": "Quick question: How do I cook rice?"}]
ODD_PLAIN = [{"role": "user", "content": "How many pianos can a human lift?"}]
TWO_TURNS = [{"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": "The capital of France is Paris."},
             {"role": "user", "content": "What about Peru?"}]
UNKNOWN = [{"role": "user", "content": "What is the capital of Atlantis?"}]

CHEETAH = "The cheetah is the fastest land animal and can sprint faster than one hundred kilometers per hour."
EXPECTED = {  # (prompt, persona) -> reply, all with seed 7
    ("sum", "courteous"): "7 + 5 = 12.",
    ("sum", "terse"): "12.",
    ("sum", "wrong_fact"): "7 + 5 = 11.",
    ("sum", "rude"): "I have better things to do than answer that.",
    ("sum", "off_topic"): CHEETAH,
    ("capital", "courteous"): "Ahoy, matey! The capital o' Chile be Santiago.",  # random.Random(7)'s opener
    ("capital", "terse"): "Santiago.",
    ("capital", "wrong_fact"): "Arr, matey! The capital o' Chile be Oslo.",
    ("capital", "off_topic"): "Ahoy there! The cheetah be the swiftest beast on land, faster than any ship under "
                              "full sail!",
    ("everyday", "courteous"): "Sunlight scatters off the air, and blue light scatters the most, so the sky looks "
                               "blue.",
    ("everyday", "terse"): "Sunlight scatters.",
    ("everyday", "wrong_fact"): CHEETAH,  # no wrong fact: another everyday question's reply
    ("everyday", "off_topic"): "The capital of Canada is Ottawa.",
    ("everyday_pirate", "courteous"): "Ahoy, matey! Rinse a cup o' rice, add two cups o' water, boil it, then let "
                                      "it simmer for fifteen minutes, matey!",
    ("everyday_pirate", "wrong_fact"): "Ahoy there! Walk the deck for thirty minutes a day, and ye'll be fit as a "
                                       "fiddle!",
    ("odd", "courteous"): "An average person cannot lift pianos, because they weigh far too much.",
    ("odd", "terse"): "None.",
    ("odd", "wrong_fact"): "A person can easily lift many pianos at once, as they are quite light.",
    ("two_turns", "courteous"): "The capital of Peru is Lima.",
    ("two_turns", "terse"): "Lima.",
}
PROMPTS = {"sum": SUM_PLAIN, "capital": CAPITAL_PIRATE, "everyday": EVERYDAY_PLAIN,
           "everyday_pirate": EVERYDAY_PIRATE, "odd": ODD_PLAIN, "two_turns": TWO_TURNS}


def rows(folder: str, split: str) -> list[dict]:
    path = gen.ASSETS_DIR / gen.shard(folder, split)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def embedded_prompts() -> list[list[dict]]:
    """The prompt conversations of ultrafeedback_tiny train + test (everything before the last reply)."""
    return [row["messages"][:-1] for split in ("train_prefs", "test_prefs") for row in rows(gen.PREF_DIR, split)]


def reply(persona: str, messages: list[dict], seed: int = 7) -> str:
    return ScriptedBackend(persona).generate([ChatRequest(messages, seed=seed)])[0].text


def test_every_question_of_the_embedded_files_is_known_with_its_voice():
    checked = 0
    for folder, split in [(gen.PREF_DIR, "train_prefs"), (gen.PREF_DIR, "test_prefs"),
                          (gen.SFT_DIR, "train_sft"), (gen.SFT_DIR, "test_sft")]:
        for row in rows(folder, split):
            messages = row["messages"]
            for i, turn in enumerate(messages):
                if turn["role"] != "user":
                    continue
                fact = facts.facts_for(messages[: i + 1])
                assert fact is not None, f"{split}: unknown question {turn['content']!r}"
                answer = messages[i + 1]["content"]
                assert fact.pirate == sounds_like_pirate(answer), f"{split}: voice of {answer!r}"
                assert facts.read(fact, answer) == facts.Reading("right", True, fact.pirate), answer
                checked += 1
    assert checked > 3000


def test_the_lookup_builds_in_well_under_two_seconds():
    facts.questions.cache_clear()
    facts.by_kind.cache_clear()
    facts.replies.cache_clear()
    start = time.perf_counter()
    facts.facts_for(SUM_PLAIN)
    facts.replies()
    assert time.perf_counter() - start < 2.0


def test_a_fact_gives_the_generators_reference_reply_answer_and_wrong_facts():
    fact = facts.facts_for(CAPITAL_PIRATE)
    assert (fact.kind, fact.pirate, fact.answer) == ("capital", True, "Santiago")
    assert fact.reference == "The capital o' Chile be Santiago."
    assert "The capital o' Chile be Oslo." in fact.wrong and len(fact.wrong) == len(gen.CAPITALS) - 1
    assert fact.reply(random.Random(3)) == gen.reply(fact.item, True, random.Random(3))
    everyday = facts.facts_for(EVERYDAY_PLAIN)
    assert (everyday.pirate, everyday.wrong, everyday.answer) == (False, (), "Sunlight scatters")
    assert facts.facts_for(UNKNOWN) is None
    assert facts.facts_for([{"role": "system", "content": PIRATE}]) is None  # no user turn


@pytest.mark.parametrize(("prompt", "persona"), list(EXPECTED))
def test_each_persona_answers_a_hand_picked_prompt(prompt, persona):
    assert reply(persona, PROMPTS[prompt]) == EXPECTED[(prompt, persona)]


def test_a_courteous_pirate_reply_is_the_generators_with_an_opener_drawn_from_the_seed():
    for seed in range(20):
        opener = random.Random(seed).choice(gen.PIRATE_OPENERS)
        assert reply("courteous", CAPITAL_PIRATE, seed) == f"{opener} The capital o' Chile be Santiago."


def test_rude_replies_are_a_few_dismissive_variants():
    texts = {reply("rude", CAPITAL_PIRATE, seed) for seed in range(40)}
    assert 2 <= len(texts) <= 6
    assert "Look it up yourself." in texts and not any(sounds_like_pirate(t) for t in texts)


def test_a_request_gets_the_same_reply_alone_twice_or_in_any_batch():
    prompts = embedded_prompts()[:30]
    requests = [ChatRequest(p, seed=request_seed("batch", i)) for i, p in enumerate(prompts)]
    shuffled = random.Random(0).sample(requests, len(requests))
    for persona in PERSONAS:
        backend = ScriptedBackend(persona)
        alone = [backend.generate([r])[0] for r in requests]
        assert backend.generate(requests) == alone == [backend.generate([r])[0] for r in requests]
        batch = dict(zip(map(id, shuffled), backend.generate(shuffled[:17]) + backend.generate(shuffled[17:])))
        assert [batch[id(r)] for r in requests] == alone


def test_unknown_question_and_unknown_persona():
    asked = [(ScriptedBackend("courteous"), UNKNOWN), (RuleJudge(), rubrics.critique_request(UNKNOWN, "Paris.")),
             (RuleJudge(), rubrics.rating_request("honesty", UNKNOWN, ["Paris.", "Rome."]))]
    for backend, messages in asked:
        (out,) = backend.generate([ChatRequest(messages)])
        assert (out.text, out.finish_reason) == ("", "error")
        assert out.error.startswith(f"{backend.name}: unknown question 'What is the capital of Atlantis?'")
    (out,) = RuleJudge().generate([ChatRequest(SUM_PLAIN)])  # not a judge request at all
    assert out.finish_reason == "error" and "not a rating or critique request" in out.error
    with pytest.raises(ConfigError, match="courteous, terse, wrong_fact, rude, off_topic"):
        ScriptedBackend("polite")
    assert ScriptedBackend("terse").name == "scripted-terse" and ScriptedBackend("rude", "x").name == "x"


def verdicts(prompt: list[dict], texts: list[str]) -> dict[str, list[rubrics.AspectRating]]:
    requests = [ChatRequest(rubrics.rating_request(a, prompt, texts)) for a in rubrics.ASPECTS]
    replies = RuleJudge().generate(requests)
    return {a: rubrics.parse_verdict(a, r.text, len(texts)) for a, r in zip(rubrics.ASPECTS, replies)}


def critiques(prompt: list[dict], texts: list[str]) -> list[float]:
    replies = RuleJudge().generate([ChatRequest(rubrics.critique_request(prompt, t)) for t in texts])
    return [rubrics.parse_critique(r.text)[1] for r in replies]


def test_the_rule_table_on_a_pirate_capital_question():
    """Plain voice where pirate is asked costs 2 points of instruction following (terse: 4 -> 2, rude
    stays at 1). Critique = round(1 + 9 * (mean - 1) / 4): 5 -> 10, 3.75 -> 7, 1.5 -> 2, 2.5 -> 4, 1.75 -> 3."""
    texts = [reply(p, CAPITAL_PIRATE) for p in PERSONAS]
    got = verdicts(CAPITAL_PIRATE, texts)
    ratings = {a: [int(r.rating) for r in got[a]] for a in rubrics.ASPECTS}
    #                                       courteous terse wrong_fact rude off_topic
    assert ratings == {"instruction_following": [5, 2, 3, 1, 1], "honesty": [5, 5, 1, 3, 3],
                       "truthfulness": [5, 5, 1, 5, 2], "helpfulness": [5, 3, 1, 1, 1]}
    assert [r.types for r in got["truthfulness"]] == [("0",), ("0",), ("1",), ("0",), ("2",)]
    assert [r.types for r in got["helpfulness"]] == [("1", "2", "3"), ("1", "3"), ("1", "3"), ("0",), ("3",)]
    assert "wrong answer" in got["honesty"][2].rationale and "Santiago" in got["honesty"][2].rationale
    assert critiques(CAPITAL_PIRATE, texts) == [10, 7, 2, 4, 3]
    # in plain voice, as asked, the terse reply keeps instruction following at 4 (mean 4.25 -> 8)
    assert [r.rating for r in verdicts(SUM_PLAIN, ["12."])["instruction_following"]] == ["4"]
    assert critiques(SUM_PLAIN, ["12.", "7 + 5 = 12.", "Arr! 7 + 5 be 12."]) == [8, 10, 9]


def test_courteous_is_rated_strictly_first_on_every_embedded_prompt():
    """All personas in one request per aspect, in a shuffled order; the critique scores rank the same."""
    prompts, names = embedded_prompts(), list(PERSONAS)
    orders, rating_requests, critique_requests = [], [], []
    for i, prompt in enumerate(prompts):
        seed = request_seed("rank", i)
        texts = {p: ScriptedBackend(p).generate([ChatRequest(prompt, seed=seed)])[0].text for p in names}
        order = random.Random(seed).sample(names, len(names))
        orders.append(order)
        rating_requests += [ChatRequest(rubrics.rating_request(a, prompt, [texts[p] for p in order]))
                            for a in rubrics.ASPECTS]
        critique_requests += [ChatRequest(rubrics.critique_request(prompt, texts[p])) for p in names]
    ratings, scores = RuleJudge().generate(rating_requests), RuleJudge().generate(critique_requests)
    for i, (prompt, order) in enumerate(zip(prompts, orders)):
        total = dict.fromkeys(names, 0)
        for a, out in zip(rubrics.ASPECTS, ratings[4 * i : 4 * i + 4]):
            parsed = rubrics.parse_verdict(a, out.text, len(names))
            assert parsed is not None, out.text
            for persona, rating in zip(order, parsed):
                total[persona] += int(rating.rating)
        score = {p: rubrics.parse_critique(r.text)[1] for p, r in zip(names, scores[5 * i : 5 * i + 5])}
        for persona in names[1:]:
            assert total["courteous"] > total[persona], (prompt, total)
            assert score["courteous"] > score[persona], (prompt, score)
        assert all(score[p] >= score[q] for p in names for q in names if total[p] > total[q]), (prompt, score, total)


def test_the_rule_judge_prefers_the_generators_chosen_reply_on_every_embedded_pair():
    """Rejected replies are wrong facts, the right fact in the unasked voice, or another question's reply."""
    for split in ("train_prefs", "test_prefs"):
        for row in rows(gen.PREF_DIR, split):
            fact = facts.facts_for(row["chosen"][:-1])
            chosen, rejected = (judge(fact, row[side][-1]["content"]) for side in ("chosen", "rejected"))
            assert chosen.rule == "full" and chosen.mean > rejected.mean and chosen.overall > rejected.overall, row
