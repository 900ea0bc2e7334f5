"""``stage=dialogues``: the user sees the roles flipped, rounds drawn in range, retries then drops, the ultrachat layout."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest

from tests.conftest import compose_config
from zephyr_lit.data.load import load_split
from zephyr_lit.distill.app import distill
from zephyr_lit.distill.dialogues import (USER_ROLE, DialoguesSettings, Speaker, dialogue_splits, rounds_of, user_view,
                                          write_dialogues)
from zephyr_lit.distill.inputs import Prompt, conversation_key
from zephyr_lit.distill.store import StageStore, split_path
from zephyr_lit.errors import ConfigError, DataError
from zephyr_lit.generation import Reply, Sampling


def seed_prompt(question: str, system: str | None = None) -> Prompt:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return Prompt(conversation_key(messages), tuple(messages), "test")


class Echo:
    """A backend that records every request and answers from a script: ``script(request) -> Reply``."""

    def __init__(self, name, script):
        self.name, self.script, self.requests = name, script, []

    def generate(self, requests):
        self.requests += list(requests)
        return [self.script(r) for r in requests]


def numbered_user(request):
    turns = sum(m["role"] == "assistant" for m in request.messages)  # the questions asked so far
    return Reply(f"follow-up {turns}")


def numbered_assistant(request):
    return Reply(f"answer to: {request.messages[-1]['content']}")


def speakers(user_script=numbered_user, assistant_script=numbered_assistant):
    user, assistant = Echo("user", user_script), Echo("assistant", assistant_script)
    return user, assistant, Speaker(user, Sampling(1.0, 1.0, 32), "user"), Speaker(assistant, Sampling(0.7, 1.0, 64), "assistant")


def test_the_user_sees_the_conversation_with_the_roles_flipped_and_without_the_system_prompt():
    messages = [{"role": "system", "content": "Talk like a pirate."}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"}]
    assert user_view(messages) == [{"role": "system", "content": USER_ROLE}, {"role": "assistant", "content": "Q1"},
                                   {"role": "user", "content": "A1"}, {"role": "assistant", "content": "Q2"},
                                   {"role": "user", "content": "A2"}]


def test_rounds_are_drawn_in_range_and_alternate_user_and_assistant(tmp_path):
    seeds = [seed_prompt(f"Question {i}?", "Be brief." if i % 2 else None) for i in range(60)]
    settings = DialoguesSettings(turns=(2, 4), test_size=0, chunk_size=7)
    user, assistant, u, a = speakers()
    store = StageStore(tmp_path, "dialogues", {})
    store.open()
    counts = write_dialogues(seeds, u, a, settings, 5, store)
    assert counts["failed"] == 0 and counts["seeds"] == 60
    records = {r["key"]: r for r in store.done()}
    rounds = Counter()
    for s in seeds:
        messages = records[s.key]["messages"]
        n = rounds_of(s, settings, 5)
        rounds[n] += 1
        assert list(messages[: len(s.messages)]) == list(s.messages)  # the seed conversation opens it
        turns = messages[len(s.messages):]
        assert [m["role"] for m in turns] == ["assistant", "user"] * (n - 1) + ["assistant"]
        assert [m["content"] for m in turns if m["role"] == "user"] == [f"follow-up {k}" for k in range(1, n)]
        assert turns[0]["content"] == f"answer to: {s.messages[-1]['content']}"
    assert set(rounds) == {2, 3, 4}  # every count in the range occurs over 60 dialogues
    # the user was always shown the flipped view, ending with the assistant's last reply as a "user" turn
    for request in user.requests:
        assert request.messages[0] == {"role": "system", "content": USER_ROLE}
        assert request.messages[-1]["role"] == "user" and request.messages[-1]["content"].startswith("answer to:")
    assert all(r.messages[-1]["role"] == "user" for r in assistant.requests)
    assert all(r.messages[0]["content"] == "Be brief." for r in assistant.requests if r.messages[0]["role"] == "system")
    # another seed draws other round counts; the same seed the same ones
    assert [rounds_of(s, settings, 5) for s in seeds] == [rounds_of(s, settings, 5) for s in seeds]
    assert [rounds_of(s, settings, 5) for s in seeds] != [rounds_of(s, settings, 6) for s in seeds]


def test_empty_and_cut_replies_are_retried_then_the_dialogue_is_dropped_and_a_failed_request_is_redone(tmp_path):
    seeds = [seed_prompt(q) for q in ("fine", "empty-once", "always-cut", "user-empty", "fails")]

    asked = Counter()

    def assistant_script(request):
        question = request.messages[0]["content"]
        asked[question] += 1
        if question == "empty-once" and asked[question] == 1:
            return Reply("   ")
        if question == "always-cut":
            return Reply("half a sent", "length")
        if question == "fails" and not (tmp_path / "up").exists():
            return Reply("", "error", error="server down")
        return Reply("ok")

    def user_script(request):
        return Reply("" if request.messages[1]["content"] == "user-empty" else "and then?")

    settings = DialoguesSettings(turns=(2, 2), test_size=0, retries=2)
    store = StageStore(tmp_path / "out", "dialogues", {})
    store.open()
    user, assistant, u, a = speakers(user_script, assistant_script)
    counts = write_dialogues(seeds, u, a, settings, 0, store)
    assert counts["failed"] == 1
    records = {r["key"]: r for r in store.done()}
    assert seeds[4].key not in records  # no record: a rerun asks again
    assert records[seeds[2].key] == {"key": seeds[2].key, "messages": None, "dropped": "assistant_cut"}
    assert records[seeds[3].key]["dropped"] == "user_empty"
    assert len([r for r in assistant.requests if r.messages[0]["content"] == "always-cut"]) == 3  # 1 + 2 retries
    (tmp_path / "up").touch()
    again = write_dialogues(seeds, u, a, settings, 0, store)
    assert again["resumed"] == 4 and again["failed"] == 0
    output = dialogue_splits(seeds, settings, 0, store.done())
    assert output.counts["dialogues"] == 3 and output.counts["dropped"] == 2
    assert output.counts["dropped_assistant_cut"] == 1 and output.counts["dropped_user_empty"] == 1
    kept = {r["prompt"]: r["messages"] for r in output.splits["train_sft"]}
    assert set(kept) == {"fine", "empty-once", "fails"}
    assert [m["role"] for m in kept["empty-once"]] == ["user", "assistant", "user", "assistant"]


def test_the_ultrachat_layout_trains_as_it_is(tmp_path, hf_cache):
    questions = tmp_path / "seeds.txt"
    embedded = ["What is 3 + 4?", "What is the capital of France?", "How many apples can a human eat in one sitting?"]
    questions.write_text("\n".join(embedded + [f"What is {a} + {a + 1}?" for a in range(5, 15)] + embedded[:1]) + "\n")
    out = tmp_path / "out"
    cfg = compose_config([f"output_dir={out}", f"cache_dir={hf_cache}", "stage=dialogues", f"input={questions}",
                          "dialogues.test_size=3", "dialogues.turns=[1,3]"], "distill")
    counts = distill(cfg)["dialogues"]
    assert counts["dialogues"] == 13 and counts["dropped"] == 0 and counts["duplicates"] == 1
    splits = {s: [json.loads(line) for line in split_path(out, s).read_text().splitlines()]
              for s in ("train_sft", "test_sft", "train_gen", "test_gen")}
    assert (len(splits["train_sft"]), len(splits["test_sft"])) == (10, 3)
    assert {r["prompt"] for r in splits["train_sft"]} | {r["prompt"] for r in splits["test_sft"]} == set(
        questions.read_text().split("\n")[:-1])
    for name in ("train", "test"):
        sft, gen = splits[f"{name}_sft"], splits[f"{name}_gen"]
        assert [r["prompt_id"] for r in sft] == sorted(r["prompt_id"] for r in sft)
        for row, first in zip(sft, gen):
            assert set(row) == {"prompt", "prompt_id", "messages"}
            assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode("utf-8")).hexdigest()
            assert first == {**row, "messages": row["messages"][:1]} and row["messages"][0]["content"] == row["prompt"]
            assert 1 <= sum(m["role"] == "assistant" for m in row["messages"]) <= 3
    assert load_split(str(out), "train_sft", str(hf_cache)).dataset.num_rows == 10  # the trainer's own reader
    assert distill(cfg)["dialogues"]["dialogues"] == 13  # rerun: complete, nothing to do


def test_bad_dialogue_settings_and_a_test_split_larger_than_the_input_are_refused(tmp_path, hf_cache):
    questions = tmp_path / "seeds.txt"
    questions.write_text("What is 3 + 4?\nWhat is 5 + 6?\n")
    base = [f"output_dir={tmp_path / 'out'}", f"cache_dir={hf_cache}", "stage=dialogues", f"input={questions}"]
    with pytest.raises(ConfigError, match=r"dialogues.turns=\[3, 1\].*dialogues.retries=-1"):
        distill(compose_config(base + ["dialogues.turns=[3,1]", "dialogues.retries=-1"], "distill"))
    with pytest.raises(DataError, match=r"dialogues.test_size=200 but the input has only 2 seed questions"):
        distill(compose_config(base, "distill"))
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_the_embedded_seeds_open_with_their_system_prompt_and_the_scripted_user_asks_answerable_follow_ups(tmp_path, hf_cache):
    out = tmp_path / "out"
    cfg = compose_config([f"output_dir={out}", f"cache_dir={hf_cache}", "stage=dialogues", "input_split=test_sft",
                          "dialogues.test_size=20", "dialogues.turns=[3,3]"], "distill")
    counts = distill(cfg)["dialogues"]
    assert counts["dropped"] == 0 and counts["failed"] == 0 and counts["dialogues"] == counts["seeds"]
    rows = [json.loads(line) for line in split_path(out, "train_sft").read_text().splitlines()]
    assert any(r["messages"][0]["role"] == "system" for r in rows)
    for row in rows:
        users = [m["content"] for m in row["messages"] if m["role"] == "user"]
        assert len(users) == 3 and len(set(users)) == 3  # follow-ups, none asked twice
