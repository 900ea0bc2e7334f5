"""``stage=instructions``: the ROUGE-L filter agrees with rouge-score, the parser reads messy lists,
unusable replies are asked again, the stage stops where it should, and a killed run resumes exactly."""

from __future__ import annotations

import itertools
import json
import random
import sys

import pytest
from rouge_score import rouge_scorer

from zephyr_lit.assets.generate import prompt_id
from zephyr_lit.distill.facts import questions
from zephyr_lit.distill.instructions import (
    InstructionsSettings, Kept, instructions_problems, near_duplicate, parse_instructions, read_request, rejection,
    request_text, rouge, rouge_l, run_instructions, shown_tasks,
)
from zephyr_lit.distill.scripted_instructions import ScriptedInstructor
from zephyr_lit.distill.store import StageStore
from zephyr_lit.errors import ConfigError
from zephyr_lit.generation import ChatRequest, Reply

SEEDS = ["Give three tips for staying healthy.", "Describe the water cycle in simple terms.",
         "Write a short poem about the sea.", "Explain how photosynthesis works.",
         "What is the capital of France?", "Suggest a name for a bakery."]


def scorer_f(a: str, b: str) -> float:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(a, b)["rougeL"].fmeasure


def kept_of(texts: list[str]) -> Kept:
    kept = Kept()
    for text in texts:
        kept.add(text)
    return kept


def store_in(folder) -> StageStore:
    store = StageStore(folder, "instructions", {"test": 1})
    store.claim()
    return store


class RandomWriter:
    """As many items as asked, each five made-up words drawn with the request's seed (ROUGE-L 0 against
    anything else). ``script``: call number (0, 1, ... over all requests) -> the Reply to give instead."""

    name = "random"

    def __init__(self, script: dict[int, Reply] | None = None) -> None:
        self.script, self.calls, self.requests = dict(script or {}), 0, []

    def generate(self, requests):
        replies = []
        for request in requests:
            self.requests.append(request)
            call, self.calls = self.calls, self.calls + 1
            if call in self.script:
                replies.append(self.script[call])
                continue
            _, wanted = read_request(request.messages[-1]["content"])
            rng = random.Random(request.seed)
            items = [" ".join(f"w{rng.randrange(10**9)}" for _ in range(5)) for _ in range(wanted)]
            replies.append(Reply("\n".join(f"{k}. {t}" for k, t in enumerate(items, 1))))
        return replies


def test_rouge_l_is_the_lcs_f_measure_computed_by_hand():
    # "explain how photosynthesis works" (4 tokens) vs "... works in plants" (6 tokens): LCS = 4 tokens,
    # P = 4/6, R = 4/4, F = 2PR / (P + R) = 2 * 4 / (4 + 6) = 0.8
    a, b = "Explain how photosynthesis works", "Explain how photosynthesis works in plants"
    assert rouge_l(a, b) == pytest.approx(0.8)
    assert rouge_l(a, b) == scorer_f(a, b) == rouge_l(b, a)


def test_near_duplicates_agree_with_rouge_score_computed_directly():
    candidates = [
        "Write a long poem about the mountains.",  # vs the sea poem: LCS 5 of 7 and 7 -> 0.714, above
        "What is the capital of Chile?",  # vs France: 5 of 6 -> 0.833, above
        "Explain how photosynthesis works in plants.",  # 0.8, above
        "Plan a three day trip to Rome on a budget.",  # unlike every seed
        "Give me three reasons to learn Spanish.",  # shares "give three" only
        "Describe a cat.",
    ]
    for candidate in candidates:
        direct = max(scorer_f(seed, candidate) for seed in SEEDS)
        assert near_duplicate(candidate, kept_of(SEEDS), 0.7) == (direct > 0.7), candidate
    assert [near_duplicate(c, kept_of(SEEDS), 0.7) for c in candidates] == [True, True, True, False, False, False]


def test_exactly_max_rouge_is_kept_and_above_is_rejected():
    kept = kept_of(["one two three four five six seven eight nine ten"])
    at = "one two three four five six seven x y z"  # LCS 7 of 10 and 10: F = 14 / 20 = 0.7
    above = "one two three four five six seven eight y z"  # LCS 8: F = 0.8
    assert scorer_f(kept.texts[0], at) == 0.7
    settings = InstructionsSettings(max_rouge=0.7)
    assert rejection(at, kept, settings) is None
    assert rejection(above, kept, settings) == "near_duplicate"
    exactly = scorer_f(kept.texts[0], above)  # 0.8 in floats as the scorer rounds it (2PR / (P + R))
    assert rejection(above, kept, InstructionsSettings(max_rouge=exactly)) is None
    assert rejection(above, kept, InstructionsSettings(max_rouge=exactly - 1e-6)) == "near_duplicate"


def test_length_filter_counts_words():
    settings, kept = InstructionsSettings(min_words=3, max_words=5), Kept()
    assert rejection("Two words", kept, settings) == "too_short"
    assert rejection("Name three birds", kept, settings) is None
    assert rejection("Name three birds that swim", kept, settings) is None
    assert rejection("Name three birds that swim well", kept, settings) == "too_long"


def test_exact_duplicates_ignore_case_and_spacing_and_other_rules_hold():
    kept, settings = kept_of(SEEDS), InstructionsSettings()
    assert rejection("  what is   THE capital of france? ", kept, settings) == "duplicate"
    assert rejection("Describe the picture I sent you.", kept, settings) == "not_text"
    assert rejection("Write a story\nabout a dragon who sings.", kept, settings) == "multi_line"
    assert rejection("How can I get better at drawing?", kept, settings) is None  # drawing is a skill, not a medium


def test_parser_reads_messy_numbered_and_bulleted_replies():
    reply = ("Here are 5 new tasks:\n\n1. Write a limerick about a cat.  \n2) **Summarize the plot of Hamlet.**\n"
             "**3.** Plan a picnic menu.\n\n- Name two uses of vinegar.\n* \"Explain what inflation is.\"\n"
             "Note: these vary in topic.\n4. Creative tasks:\n")
    assert parse_instructions(reply) == ["Write a limerick about a cat.", "Summarize the plot of Hamlet.",
                                         "Plan a picnic menu.", "Name two uses of vinegar.",
                                         "Explain what inflation is."]
    assert parse_instructions("Some tasks:\nList three fruits.\n\nTranslate 'hello' to French.\n") == [
        "List three fruits.", "Translate 'hello' to French."]
    assert parse_instructions("") == [] and parse_instructions("Here they are:\n\n") == []
    assert parse_instructions("-5 degrees is cold.\n**Bold line**") == ["-5 degrees is cold.", "Bold line"]


def test_request_reads_back_and_shows_seeds_and_generated_tasks():
    shown = ["Describe a cat.", "Write a line\nof verse."]
    assert read_request(request_text(shown, 7)) == (["Describe a cat.", "Write a line of verse."], 7)
    with pytest.raises(ValueError):
        read_request("Write 3 poems.")
    settings = InstructionsSettings(seed_tasks=3, generated_tasks=2)
    drawn = shown_tasks(SEEDS, ["new one", "new two", "new three"], settings, 1, 5)
    assert drawn == shown_tasks(SEEDS, ["new one", "new two", "new three"], settings, 1, 5)
    assert len(drawn) == 5 and sum(t.startswith("new") for t in drawn) == 2
    assert len(shown_tasks(SEEDS, [], settings, 1, 5)) == 3


def test_empty_cut_and_unreadable_replies_are_asked_again_and_errors_are_failed(tmp_path):
    settings = InstructionsSettings(num_instructions=1000, max_requests=3, chunk_size=3, per_request=2, retries=2)
    # call order: attempt 0 of requests 0, 1, 2; then the retries of the ones asked again
    script = {0: Reply(""), 1: Reply("1. A good task, but cut", "length"), 2: Reply("", "error", error="down"),
              3: Reply("no list here:"), 5: Reply("nothing:"), 6: Reply("still nothing:")}
    writer = RandomWriter(script)
    out = run_instructions(SEEDS, writer, settings, 3, store_in(tmp_path))
    # request 0: empty, unreadable, then unreadable again (recorded, unparsed); request 1: cut, then fine
    records = {r["request"]: r for r in StageStore(tmp_path, "instructions", {"test": 1}).done()}
    assert sorted(records) == [0, 1] and records[0]["attempt"] == 2 and records[1]["attempt"] == 1
    assert [r.seed for r in writer.requests[:2]] != [r.seed for r in writer.requests[3:5]]  # new attempt seeds
    assert out.counts["failed"] == 1 and out.counts["unparsed"] == 1 and out.counts["retried"] == 3
    assert out.counts["kept"] == 2 and [r["request"] for r in out.splits["train"]] == [1, 1]


def test_stops_at_exactly_num_instructions_and_rows_have_the_layout(tmp_path):
    settings = InstructionsSettings(num_instructions=10, per_request=4, chunk_size=2, max_requests=50)
    out = run_instructions(SEEDS, RandomWriter(), settings, 0, store_in(tmp_path))
    rows = out.splits["train"]
    assert len(rows) == 10 and out.counts["requests"] == 4 and out.counts["surplus"] == 6
    assert out.counts["gave_up"] == 0 and out.counts["proposed"] == 16
    assert rows[0] == {"instruction": rows[0]["instruction"], "prompt_id": prompt_id(rows[0]["instruction"]),
                       "source": "self-instruct", "request": 0}
    assert out.files["questions.txt"] == "\n".join(r["instruction"] for r in rows) + "\n"


class SameWriter:
    name = "same"

    def generate(self, requests):
        return [Reply("1. Write a haiku about autumn leaves.\n2. Write a haiku about autumn leaves.")
                for _ in requests]


def test_gives_up_after_max_requests(tmp_path):
    settings = InstructionsSettings(num_instructions=5, max_requests=3, chunk_size=2)
    out = run_instructions(SEEDS, SameWriter(), settings, 0, store_in(tmp_path))
    assert out.counts["requests"] == 3 and out.counts["gave_up"] == 1
    assert out.counts["kept"] == 1 and out.counts["duplicate"] == 5 and out.counts["proposed"] == 6


def known_seeds(n: int = 10) -> list[str]:
    return random.Random(0).sample(sorted(questions()), n)


class Counting:
    """``inner``, remembering every request it was given."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.requests = inner, inner.name, []

    def generate(self, requests):
        self.requests += requests
        return self.inner.generate(requests)


RESUME = InstructionsSettings(num_instructions=40, per_request=8, chunk_size=4, max_requests=200)


def test_a_killed_run_resumes_to_the_same_output(tmp_path):
    whole = run_instructions(known_seeds(), ScriptedInstructor(), RESUME, 7, store_in(tmp_path / "whole"))
    folder = tmp_path / "killed"
    run_instructions(known_seeds(), ScriptedInstructor(), RESUME, 7, store_in(folder))
    path = folder / ".work" / "records.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) > RESUME.chunk_size + 1
    path.write_text("".join(lines[: RESUME.chunk_size]) + lines[RESUME.chunk_size][:20], encoding="utf-8")
    writer = Counting(ScriptedInstructor())
    again = run_instructions(known_seeds(), writer, RESUME, 7, store_in(folder))
    assert again.splits == whole.splits and again.files == whole.files
    assert {k: v for k, v in again.counts.items() if k != "resumed"} == {
        k: v for k, v in whole.counts.items() if k != "resumed"}
    assert again.counts["resumed"] == RESUME.chunk_size and len(writer.requests) == whole.counts["requests"] - 4
    assert all(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())  # no torn line left
    replayed = run_instructions(known_seeds(), SameWriter(), RESUME, 7, store_in(folder))  # all done: nothing asked
    assert replayed.splits == whole.splits and replayed.counts["resumed"] == whole.counts["requests"]


def test_failed_requests_are_asked_again_on_a_rerun(tmp_path):
    settings = InstructionsSettings(num_instructions=100, max_requests=2, chunk_size=2, per_request=3, retries=0)
    first = run_instructions(SEEDS, RandomWriter({1: Reply("", "error", error="timeout")}), settings, 0,
                             store_in(tmp_path))
    assert first.counts["failed"] == 1 and first.counts["kept"] == 3
    second = run_instructions(SEEDS, RandomWriter(), settings, 0, store_in(tmp_path))
    assert second.counts["failed"] == 0 and second.counts["resumed"] == 1 and second.counts["kept"] == 6


def test_scripted_instructor_grows_known_distinct_questions(tmp_path):
    seeds = known_seeds()
    settings = InstructionsSettings(num_instructions=30)
    out = run_instructions(seeds, ScriptedInstructor(), settings, 42, store_in(tmp_path))
    made = [r["instruction"] for r in out.splits["train"]]
    assert len(made) == 30 and out.counts["gave_up"] == 0 and out.counts["failed"] == 0
    assert all(m in questions() for m in made) and not set(made) & set(seeds)
    assert all(scorer_f(a, b) <= 0.7 for a, b in itertools.combinations(seeds + made, 2) if b in made)


def test_scripted_instructor_leaves_out_what_it_was_shown_and_refuses_other_requests():
    shown = known_seeds(6)
    request = ChatRequest([{"role": "user", "content": request_text(shown, 5)}], seed=3)
    reply = ScriptedInstructor().generate([request])[0]
    items = parse_instructions(reply.text)
    assert reply.ok and len(items) == 5 and not set(items) & set(shown) and all(i in questions() for i in items)
    assert reply == ScriptedInstructor().generate([request])[0]
    bad = ScriptedInstructor().generate([ChatRequest([{"role": "user", "content": "Hi"}])])[0]
    assert bad.finish_reason == "error" and "not an instructions request" in bad.error


def test_every_bad_setting_is_named():
    problems = instructions_problems(InstructionsSettings(max_rouge=1.5, min_words=10, max_words=5, per_request=0,
                                                          chunk_size=0, retries=-1))
    text = "\n".join(problems)
    for key in ("max_rouge=1.5", "max_words=5", "per_request=0", "chunk_size=0", "retries=-1"):
        assert f"instructions.{key}" in text
    assert instructions_problems(InstructionsSettings()) == []
    assert any("never be reached" in p for p in instructions_problems(
        InstructionsSettings(num_instructions=100, max_requests=2, per_request=8)))


def test_a_missing_rouge_score_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # import rouge_score now fails
    rouge.cache_clear()
    try:
        with pytest.raises(ConfigError, match="pip install rouge-score"):
            rouge_l("a b", "a c")
    finally:
        rouge.cache_clear()
