"""The embedded evaluation sets, written by ``generate.main`` from the SFT test split's questions.

- ``data/eval/mt_bench_tiny/question.jsonl``: FastChat ``llm_judge`` question schema (``question_id``,
  ``category``, two ``turns``, ``reference`` in math and reasoning). Each kind of embedded question is an
  MT-Bench category (``CATEGORIES``); the second turn asks about another fact of the same kind
  (a follow-up wording for sums and capitals), so its answer follows from the conversation.
- ``data/eval/alpaca_eval_tiny.json``: AlpacaEval's eval set schema (``instruction``, ``output``,
  ``generator``, ``dataset``), 5 instructions per kind (other than MT-Bench's first turns where the split has
  enough); the outputs are the bare facts (``"12."``), a reference that a full, correct reply beats and a
  wrong one loses to.
- ``data/eval/judge_prompts.jsonl``: the project's judge prompts in FastChat's ``judge_prompts.jsonl``
  schema, under FastChat's entry names, in the project's own wording (``JUDGE_PROMPTS``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from zephyr_lit.assets.generate import EVAL_DIR, follow_up_items, write_jsonl

MT_BENCH = f"{EVAL_DIR}/mt_bench_tiny/question.jsonl"
ALPACA_EVAL = f"{EVAL_DIR}/alpaca_eval_tiny.json"
JUDGE_PROMPTS = f"{EVAL_DIR}/judge_prompts.jsonl"
CATEGORIES = {"arith": "math", "odd": "reasoning", "capital": "humanities", "everyday": "writing"}
WITH_REFERENCE = ("math", "reasoning")
PER_KIND = 5  # questions per kind in each set
REFERENCE_GENERATOR = "embedded_terse"

_RULES = ("Judge correctness first, then helpfulness, relevance, depth and clarity; a longer reply is not a better one "
          "for being longer.")
_RATE = ("Explain your grade in two or three sentences, then give it as a number from 1 (useless) to 10 (excellent) "
         "inside double square brackets on the last line, like this: Rating: [[4]]")
_REFERENCE = "A correct reference answer is shown: check the reply against it and grade any mistake severely. "
_SECOND = ("Grade only the assistant's second reply; the first exchange is there as context (the second question "
           "may lean on it). ")
_TURNS = "### User\n{question_1}\n\n### Assistant\n{answer_1}\n\n### User\n{question_2}\n\n### Assistant\n{answer_2}"
_SYSTEM = "You grade the replies of AI assistants, carefully and impartially."


def judge_prompt_rows() -> list[dict]:
    """The project's judge prompts, in the FastChat schema."""
    single = f"Grade how well the assistant answered the user's question. {_RULES} "
    return [
        {"name": "single-v1", "type": "single", "system_prompt": _SYSTEM, "output_format": "[[rating]]",
         "category": "general", "prompt_template": single + _RATE
         + "\n\n### Question\n{question}\n\n### Assistant's reply\n{answer}\n\n### End"},
        {"name": "single-math-v1", "type": "single", "system_prompt": _SYSTEM, "output_format": "[[rating]]",
         "category": "math", "prompt_template": single + _REFERENCE + _RATE
         + "\n\n### Question\n{question}\n\n### Reference answer\n{ref_answer_1}\n\n### Assistant's reply\n{answer}"
         "\n\n### End"},
        {"name": "single-v1-multi-turn", "type": "single", "system_prompt": _SYSTEM, "output_format": "[[rating]]",
         "category": "general", "prompt_template": single + _SECOND + _RATE + "\n\n" + _TURNS + "\n\n### End"},
        {"name": "single-math-v1-multi-turn", "type": "single", "system_prompt": _SYSTEM,
         "output_format": "[[rating]]", "category": "math", "prompt_template": single + _SECOND + _REFERENCE + _RATE
         + "\n\n### Reference answers\n1. {ref_answer_1}\n2. {ref_answer_2}\n\n" + _TURNS + "\n\n### End"},
        {"name": "pair-v2", "type": "pairwise", "system_prompt": _SYSTEM, "output_format": "[[A]]",
         "category": "general", "prompt_template":
         "Two assistants, A and B, replied to the same user question. Decide which reply is better. " + _RULES
         + " The order in which the replies appear says nothing about them. Explain your choice in two or three "
         "sentences, then give your verdict inside double square brackets on the last line: [[A]] if A's reply is "
         "better, [[B]] if B's is, [[C]] if they are equally good."
         "\n\n### Question\n{question}\n\n### Reply A\n{answer_a}\n\n### Reply B\n{answer_b}\n\n### End"},
    ]


def plain_pairs(test_sft: list, kind: str) -> list[tuple[str, str]]:
    """(question, reference reply) of the single-turn rows of ``kind`` without a system turn, in split order."""
    rows = [r for r in test_sft if r.kind == kind and not r.pirate and not r.multi_turn]
    return [(r.data["messages"][0]["content"], r.data["messages"][1]["content"])
            for r in rows if r.data["messages"][0]["role"] == "user"]


def second_turns(test_sft: list, kind: str, first: list[tuple[str, str]], rng: random.Random) -> list[tuple[str, str]]:
    """A second question (and its reference) for each first one: another fact of the same kind."""
    follow_ups = follow_up_items().get(kind)
    pool = [(i.question, i.plain) for i in follow_ups] if follow_ups else plain_pairs(test_sft, kind)
    return [rng.choice([p for p in pool if p[1] != reference]) for _, reference in first]


def mt_bench_rows(test_sft: list, rng: random.Random) -> list[dict]:
    rows = []
    for kind, category in CATEGORIES.items():
        firsts = plain_pairs(test_sft, kind)[:PER_KIND]
        for (q1, r1), (q2, r2) in zip(firsts, second_turns(test_sft, kind, firsts, rng)):
            row = {"question_id": len(rows) + 1, "category": category, "turns": [q1, q2]}
            rows.append({**row, "reference": [r1, r2]} if category in WITH_REFERENCE else row)
    return rows


def alpaca_eval_rows(test_sft: list) -> list[dict]:
    from zephyr_lit.distill.facts import bare_answer, questions  # facts.py builds on generate.py: import when used

    rows = []
    for kind in CATEGORIES:
        pairs = plain_pairs(test_sft, kind)
        for question, _ in (pairs[PER_KIND:] + pairs[:PER_KIND])[:PER_KIND]:  # others than MT-Bench's, while there are
            rows.append({"instruction": question, "output": f"{bare_answer(questions()[question])}.",
                         "generator": REFERENCE_GENERATOR, "dataset": f"embedded_{kind}"})
    return rows


def write_eval_sets(out: Path, test_sft: list, seed: int) -> None:
    """Write the three files under ``out`` (the assets folder), deterministically."""
    write_jsonl(out / MT_BENCH, mt_bench_rows(test_sft, random.Random(seed)))
    write_jsonl(out / JUDGE_PROMPTS, judge_prompt_rows())
    (out / ALPACA_EVAL).write_text(json.dumps(alpaca_eval_rows(test_sft), indent=2, ensure_ascii=False) + "\n",
                                   encoding="utf-8", newline="\n")
