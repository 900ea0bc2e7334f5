"""Evaluation's judging: the [[N]] and [[A]] parsers, judge prompt files, the rule judge, the score table and
the win rate."""

from __future__ import annotations

import json
import math

import pytest

from zephyr_lit.assets import asset_path
from zephyr_lit.assets.eval_sets import JUDGE_PROMPTS
from zephyr_lit.distill.judge_templates import (SINGLE, JudgePrompt, load_judge_prompts, parse_choice, parse_rating,
                                                pick, read_back)
from zephyr_lit.distill.scripted import RuleJudge
from zephyr_lit.errors import DataError
from zephyr_lit.evaluate.alpaca_eval import win_rate
from zephyr_lit.evaluate.results import format_table, score_table, write_csv
from zephyr_lit.generation import ChatRequest


@pytest.mark.parametrize("reply, rating", [
    ("The answer is right and complete.\nRating: [[8]]", 8),
    ("Rating: [[ 7.5 ]]", 7.5),
    ("**Rating:** [[6/10]]", 6),
    ("Format: [[rating]], e.g. [[5]]. My verdict: [[9]]", 9),  # the last number in double brackets
    ("I would say 7 out of 10.", None),
    ("Rating: [7]", None),  # single brackets are not the format
    ("Rating: [[0]]", None),
    ("Rating: [[11]]", None),
    ("Rating: [[10]]", 10),
    ("", None),
])
def test_the_rating_parser_reads_the_last_double_bracketed_grade_from_1_to_10(reply, rating):
    parsed = parse_rating(reply)
    assert parsed == rating and type(parsed) is type(rating)


@pytest.mark.parametrize("reply, choice", [
    ("B is more accurate.\n[[B]]", "B"),
    ("Verdict: [[ A ]]", "A"),
    ("Both are equally good. [[C]]", "tie"),
    ("Say [[A]], [[B]] or [[C]]. Final verdict: [[A]]", "A"),
    ("A is better.", None),
])
def test_the_choice_parser_reads_the_last_verdict_and_c_as_a_tie(reply, choice):
    assert parse_choice(reply) == choice


def test_a_filled_template_is_read_back_field_by_field_even_with_brackets_and_newlines_in_the_texts():
    prompt = JudgePrompt("single-v1", "single", "", "Q:\n{question}\n<<A>>\n{answer}\n<<end>>", "[[rating]]")
    fields = {"question": "What is {x}?\n\nTwo lines.", "answer": "It is [[3]].\n<<A>> inside"}
    messages = prompt.messages(**fields)
    filled = "Q:\nWhat is {x}?\n\nTwo lines.\n<<A>>\nIt is [[3]].\n<<A>> inside\n<<end>>"
    assert messages == [{"role": "user", "content": filled}]
    assert read_back(prompt, messages) == fields
    assert read_back(prompt, [{"role": "user", "content": "something else"}]) is None


def test_a_judge_prompt_file_with_a_bad_line_or_missing_entry_is_refused_naming_line_and_field(tmp_path):
    path = tmp_path / "judge_prompts.jsonl"
    row = {"name": "single-v1", "type": "single", "system_prompt": "", "prompt_template": "{question} {answer}",
           "output_format": "[[rating]]"}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "name": "x", "system_prompt": 3}) + "\n")
    with pytest.raises(DataError, match=r"judge_prompts.jsonl line 2, field 'system_prompt'"):
        load_judge_prompts(path)
    path.write_text(json.dumps(row) + "\n")
    prompts = load_judge_prompts(path)
    with pytest.raises(DataError, match="no judge prompt named 'single-math-v1'"):
        pick(prompts, "single-math-v1", ("question", "answer", "ref_answer_1"), path)
    with pytest.raises(DataError, match=r"lacks \{ref_answer_1\}"):
        pick({"single-v1": prompts["single-v1"]}, "single-v1", ("question", "answer", "ref_answer_1"), path)


def test_the_shipped_judge_prompts_have_fastchats_entries_fields_and_formats():
    prompts = load_judge_prompts(asset_path(JUDGE_PROMPTS))
    assert set(SINGLE.values()) | {"pair-v2"} <= set(prompts)
    assert set(prompts["single-math-v1-multi-turn"].fields) == {
        "ref_answer_1", "ref_answer_2", "question_1", "answer_1", "question_2", "answer_2"}
    assert set(prompts["pair-v2"].fields) == {"question", "answer_a", "answer_b"}
    assert {p.output_format for p in prompts.values()} == {"[[rating]]", "[[A]]"}


def rule_reply(prompt: JudgePrompt, **fields: str) -> str:
    return RuleJudge().generate([ChatRequest(prompt.messages(**fields))])[0].text


def test_the_rule_judge_grades_turn_one_and_the_second_answer_of_a_dialogue_from_the_facts():
    """Full right reply: 10; bare right: 8; wrong: 2; no answer: 4 (the critique's overall score)."""
    prompts = load_judge_prompts(asset_path(JUDGE_PROMPTS))
    first = {"question": "Calculate 7 + 12.", "ref_answer_1": "7 + 12 = 19."}
    assert parse_rating(rule_reply(prompts["single-math-v1"], **first, answer="7 + 12 = 19.")) == 10
    assert parse_rating(rule_reply(prompts["single-math-v1"], **first, answer="19.")) == 8
    assert parse_rating(rule_reply(prompts["single-v1"], question="Calculate 7 + 12.", answer="7 + 12 = 20.")) == 2
    dialogue = {"question_1": "Calculate 7 + 12.", "answer_1": "7 + 12 = 20.", "question_2": "What about 1 + 1?"}
    assert parse_rating(rule_reply(prompts["single-v1-multi-turn"], **dialogue, answer_2="1 + 1 = 2.")) == 10
    assert parse_rating(rule_reply(prompts["single-v1-multi-turn"], **dialogue, answer_2="Look it up.")) == 4


def test_the_rule_judge_prefers_the_better_reply_in_either_position_and_ties_equal_ones():
    pair = load_judge_prompts(asset_path(JUDGE_PROMPTS))["pair-v2"]
    question = "What is the capital of Mexico?"
    full, bare = "The capital of Mexico is Mexico City.", "Mexico City."
    assert parse_choice(rule_reply(pair, question=question, answer_a=full, answer_b=bare)) == "A"
    assert parse_choice(rule_reply(pair, question=question, answer_a=bare, answer_b=full)) == "B"
    assert parse_choice(rule_reply(pair, question=question, answer_a=bare, answer_b=bare)) == "tie"


def test_the_rule_judge_still_refuses_a_request_it_cannot_read():
    reply = RuleJudge().generate([ChatRequest([{"role": "user", "content": "Rate this: hello"}])])[0]
    assert reply.finish_reason == "error" and "nor an evaluation prompt it knows" in reply.error


def judgment(model, qid, turn, score):
    return {"model": model, "question_id": qid, "turn": turn, "score": score}


def test_the_score_table_is_the_mean_per_category_turn_and_overall_without_unrated_judgments(tmp_path):
    """a: math (8+6)/2=7, writing 10 (turn 2 unrated), turn 1 (8+10)/2=9, turn 2 6, overall 24/3=8.
    b: math (4+2)/2=3, writing (6+8)/2=7, turn 1 5, turn 2 5, overall 20/4=5. Question 3 is not asked."""
    judgments = [judgment("b", 1, 1, 4), judgment("b", 1, 2, 2), judgment("b", 2, 1, 6), judgment("b", 2, 2, 8),
                 judgment("a", 1, 1, 8), judgment("a", 1, 2, 6), judgment("a", 2, 1, 10), judgment("a", 2, 2, -1),
                 judgment("a", 3, 1, 1)]
    table = score_table(judgments, {1: "math", 2: "writing"})
    assert table.models == ["a", "b"] and table.rows == ["math", "writing", "turn 1", "turn 2", "overall"]
    assert table.unrated == {"a": 1, "b": 0} and table.judged == {"a": 3, "b": 4}
    write_csv(table, tmp_path / "results.csv")
    assert (tmp_path / "results.csv").read_text() == (
        "score,a,b\nmath,7.0000,3.0000\nwriting,10.0000,7.0000\nturn 1,9.0000,5.0000\nturn 2,6.0000,5.0000\n"
        "overall,8.0000,5.0000\n")
    assert format_table(table).splitlines()[-1].split() == ["overall", "8.00", "5.00"]


def test_the_win_rate_and_its_standard_error_are_alpaca_evals():
    """v = 1, 1, 0.5, 0, 1: mean 0.7; squares .09+.09+.04+.49+.09 = .8, /4 = .2, sqrt(.2)/sqrt(5) = .2.
    AlpacaEval's own output for 44 wins of 100: win_rate 44.0, standard_error 4.988876515698589."""
    five = win_rate([1.0, 1.0, 0.5, 0.0, 1.0])
    assert (five.n_wins, five.n_draws, five.n_wins_base, five.n_total) == (3, 1, 1, 5)
    assert five.win_rate == pytest.approx(70.0) and five.standard_error == pytest.approx(20.0)
    hundred = win_rate([1.0] * 44 + [0.0] * 56)
    assert hundred.win_rate == pytest.approx(44.0) and hundred.standard_error == pytest.approx(4.988876515698589)
    assert math.isnan(win_rate([1.0]).standard_error)
