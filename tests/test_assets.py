"""The bundled tiny assets: dataset schemas and splits, the tokenizer, the config, determinism."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zephyr_lit.assets import (
    ASSETS_DIR,
    EXACT_MATCH,
    PREF_DATA,
    SFT_DATA,
    TINY_MODEL,
    asset_path,
    sounds_like_pirate,
)
from zephyr_lit.chat import render

REPO_ROOT = Path(__file__).resolve().parents[1]
SFT_KEYS = ["prompt", "prompt_id", "messages"]
PREF_KEYS = ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"]
PIRATE_OPENING_WORDS = ("Arr", "Ahoy", "Avast", "Yo ho")
GENERATED_FOLDERS = (SFT_DATA, PREF_DATA, TINY_MODEL)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def shard(folder: str, split: str) -> str:
    return asset_path(f"{folder}/data/{split}-00000-of-00001.jsonl")


@pytest.fixture(scope="module")
def sft() -> dict[str, list[dict]]:
    return {split: read_jsonl(shard(SFT_DATA, split)) for split in ("train_sft", "test_sft")}


@pytest.fixture(scope="module")
def prefs() -> dict[str, list[dict]]:
    return {split: read_jsonl(shard(PREF_DATA, split)) for split in ("train_prefs", "test_prefs")}


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(asset_path(TINY_MODEL))


def all_conversations(sft, prefs) -> list[list[dict]]:
    convs = [row["messages"] for rows in sft.values() for row in rows]
    convs += [row[key] for rows in prefs.values() for row in rows for key in ("chosen", "rejected")]
    return convs


def has_pirate_system(messages: list[dict]) -> bool:
    return messages[0]["role"] == "system" and "pirate" in messages[0]["content"].lower()


def replies(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant"]


SUM = re.compile(r"^(?:.+! )?(\d+) \+ (\d+) (?:=|be) \d+\.$")
CAPITAL = re.compile(r"^(?:.+! )?The capital (?:of|o') (.+?) (?:is|be) .+\.$")
ODD = re.compile(r"^How many (.+?) (?:can a human|can a person|could one person) (.+)\?$")


def fact(user: str, reply: str) -> tuple | None:
    """What a turn asks about, whatever its wording and voice: a sum's operands, a country, or the
    (thing, verb) of an odd question; None for an everyday question."""
    if match := SUM.match(reply):
        return ("sum", *match.groups())
    if match := CAPITAL.match(reply):
        return ("capital", match.group(1))
    if match := ODD.match(user):
        return ("odd", *match.groups())
    return None


def turn_facts(messages: list[dict]) -> list[tuple | None]:
    """``fact`` of each user/assistant turn, in order."""
    body = [m["content"] for m in messages if m["role"] != "system"]
    return [fact(user, reply) for user, reply in zip(body[0::2], body[1::2])]


def check_turns(messages: list[dict]) -> None:
    """Optional system turn, then user/assistant alternating, ending with the assistant."""
    body = messages[1:] if messages[0]["role"] == "system" else messages
    assert [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2)
    assert len(body) in (2, 4)
    assert all(set(m) == {"role", "content"} and m["content"] for m in messages)


# ----------------------------------------------------------------------------- paths


def test_asset_path_resolves_and_reports_missing():
    assert Path(asset_path(TINY_MODEL)) == ASSETS_DIR / TINY_MODEL
    assert Path(asset_path(EXACT_MATCH)).is_file()
    with pytest.raises(FileNotFoundError, match="no/such/file"):
        asset_path("no/such/file")


def test_assets_stay_small():
    size = sum(p.stat().st_size for p in ASSETS_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert size < 2_000_000


# ----------------------------------------------------------------------------- SFT data


def test_sft_schema_matches_ultrachat(sft):
    assert len(sft["train_sft"]) >= 2000 and len(sft["test_sft"]) >= 150
    for rows in sft.values():
        for row in rows:
            assert list(row) == SFT_KEYS
            check_turns(row["messages"])
            first_user = next(m for m in row["messages"] if m["role"] == "user")
            assert row["prompt"] == first_user["content"]
            assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode("utf-8")).hexdigest()


def test_sft_has_system_and_multi_turn_variety(sft):
    rows = sft["train_sft"]
    with_system = sum(r["messages"][0]["role"] == "system" for r in rows)
    multi_turn = sum(len(replies(r["messages"])) == 2 for r in rows)
    assert 0.2 * len(rows) < with_system < 0.9 * len(rows)
    assert multi_turn >= 50
    conversations = [json.dumps(r["messages"]) for r in rows]
    assert len(set(conversations)) == len(conversations)


def test_sft_test_prompts_are_held_out(sft):
    train = {r["prompt"] for r in sft["train_sft"]}
    test = {r["prompt"] for r in sft["test_sft"]}
    assert test and not train & test


def test_sums_are_correct(sft):
    checked = 0
    for rows in sft.values():
        for row in rows:
            for reply in replies(row["messages"]):
                tail = reply.split("! ", 1)[-1]  # drop a pirate opener
                for sep in (" = ", " be "):
                    left, _, right = tail.partition(sep)
                    if left.count(" + ") == 1 and right.rstrip(".").isdigit():
                        a, b = left.split(" + ")
                        assert int(a) + int(b) == int(right.rstrip(".")), reply
                        checked += 1
    assert checked > 500


def test_each_country_has_one_capital(sft, prefs):
    pattern = re.compile(r"The capital (?:of|o') (.+?) (?:is|be) (.+)\.$")
    capitals: dict[str, set[str]] = {}
    convs = [r["messages"] for split in sft.values() for r in split]
    for messages in convs:
        for reply in replies(messages):
            if match := pattern.search(reply):
                capitals.setdefault(match.group(1), set()).add(match.group(2))
    assert len(capitals) >= 30
    assert {country: len(cities) for country, cities in capitals.items() if len(cities) != 1} == {}
    assert capitals["France"] == {"Paris"} and capitals["Japan"] == {"Tokyo"}
    for row in prefs["train_prefs"]:  # a wrong capital in a rejected reply is another real capital
        if match := pattern.search(row["rejected"][-1]["content"]):
            country, city = match.groups()
            assert city in set().union(*capitals.values())
            if row["chosen"][-1]["content"].endswith(f" {city}."):
                continue  # same fact in the wrong voice
            assert city not in capitals[country]


# ----------------------------------------------------------------------------- pirate voice


def test_sounds_like_pirate_on_examples():
    assert sounds_like_pirate("Arr, matey! 7 + 5 be 12.")
    assert sounds_like_pirate("AHOY there, me hearty!")
    assert not sounds_like_pirate("7 + 5 = 12.")
    assert not sounds_like_pirate("I will arrive at the harbor by bye-time.")  # no whole-word marker
    assert not sounds_like_pirate("The capital of France is Paris.")


def test_pirate_voice_follows_the_system_prompt(sft, prefs):
    n_pirate = n_plain = 0
    rows = [r["messages"] for split in sft.values() for r in split]
    rows += [r["chosen"] for split in prefs.values() for r in split]
    for messages in rows:
        pirate = has_pirate_system(messages)
        for reply in replies(messages):
            assert sounds_like_pirate(reply) == pirate, (messages[0], reply)
            if pirate:
                assert reply.startswith(PIRATE_OPENING_WORDS), reply
        n_pirate += pirate
        n_plain += not pirate
    assert n_pirate > 800 and n_plain > 800


def test_no_helicopter_question_anywhere():
    for folder in (SFT_DATA, PREF_DATA):
        for path in Path(asset_path(folder)).rglob("*.jsonl"):
            assert "helicopter" not in path.read_text(encoding="utf-8").lower(), path


def test_model_card_system_prompt_is_used(sft):
    card = "You are a friendly chatbot who always responds in the style of a pirate"
    assert sum(r["messages"][0]["content"] == card for r in sft["train_sft"]) >= 200


# ----------------------------------------------------------------------------- exact match


def test_exact_match_lines_are_held_out_single_answers(sft):
    lines = read_jsonl(asset_path(EXACT_MATCH))
    assert 40 <= len(lines) <= 60
    test_rows = {(r["prompt_id"], json.dumps(r["messages"][:-1])): r for r in sft["test_sft"]}
    train_prompts = {r["prompt"] for r in sft["train_sft"]}
    for line in lines:
        assert list(line) == ["prompt_id", "messages", "answer"]
        assert line["messages"][-1]["role"] == "user"
        row = test_rows[(line["prompt_id"], json.dumps(line["messages"]))]
        assert row["messages"][-1] == {"role": "assistant", "content": line["answer"]}
        assert row["prompt"] not in train_prompts
        assert not sounds_like_pirate(line["answer"])
        assert " = " in line["answer"] or line["answer"].startswith("The capital of ")


def test_sft_test_facts_are_taught_in_train_sft(sft):
    """test_sft rewords trained facts (exact_match included); only a few everyday questions are
    held out entirely."""
    taught = {f for row in sft["train_sft"] for f in turn_facts(row["messages"])} - {None}
    checked = 0
    for row in sft["test_sft"]:
        for f in turn_facts(row["messages"]):
            if f is not None:
                assert f in taught, (f, row["messages"])
                checked += 1
    assert checked >= 100
    for line in read_jsonl(asset_path(EXACT_MATCH)):
        assert fact(line["messages"][-1]["content"], line["answer"]) in taught, line


# ----------------------------------------------------------------------------- preference data


def test_prefs_schema_matches_ultrafeedback(prefs):
    assert len(prefs["train_prefs"]) >= 600 and len(prefs["test_prefs"]) >= 80
    for rows in prefs.values():
        for row in rows:
            assert list(row) == PREF_KEYS
            check_turns(row["chosen"])
            check_turns(row["rejected"])
            assert row["messages"] == row["chosen"]
            assert row["chosen"][:-1] == row["rejected"][:-1]
            assert row["chosen"][-1] != row["rejected"][-1]
            assert row["prompt"] == next(m["content"] for m in row["chosen"] if m["role"] == "user")
            assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode("utf-8")).hexdigest()
            assert isinstance(row["score_chosen"], float) and isinstance(row["score_rejected"], float)
            assert row["score_chosen"] > row["score_rejected"]


def test_rejected_replies_do_not_give_themselves_away_by_length(prefs):
    for rows in prefs.values():
        for row in rows:
            chosen, rejected = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
            assert 0.6 <= len(rejected) / len(chosen) <= 1.6, (chosen, rejected)


def test_rejected_kinds_are_mixed(prefs):
    rows = prefs["train_prefs"]
    pirate_rows = [r for r in rows if has_pirate_system(r["chosen"])]
    plain_voice = sum(not sounds_like_pirate(r["rejected"][-1]["content"]) for r in pirate_rows)
    assert 0.3 * len(pirate_rows) < plain_voice < 0.9 * len(pirate_rows)  # the rest: wrong facts
    sums = [r for r in rows if not has_pirate_system(r["chosen"]) and " = " in r["chosen"][-1]["content"]]
    for row in sums:
        right = int(row["chosen"][-1]["content"].split(" = ")[1].rstrip("."))
        wrong = int(row["rejected"][-1]["content"].split(" = ")[1].rstrip("."))
        assert 1 <= abs(right - wrong) <= 3


def test_pref_test_prompts_are_held_out(sft, prefs):
    test = {r["prompt"] for r in prefs["test_prefs"]}
    assert test
    assert not test & {r["prompt"] for r in prefs["train_prefs"]}
    assert not test & {r["prompt"] for r in sft["train_sft"]}


def test_pref_test_facts_are_trained_in_both_training_splits(sft, prefs):
    """Every sum, capital and odd question of test_prefs (any turn) is taught by train_sft and scored
    by train_prefs (as the final turn, the one the DPO loss sees): only its wording is new."""
    taught = {f for row in sft["train_sft"] for f in turn_facts(row["messages"])}
    scored = {turn_facts(row["chosen"])[-1] for row in prefs["train_prefs"]}
    counts: dict[str, int] = {}
    for row in prefs["test_prefs"]:
        for f in turn_facts(row["chosen"]):
            if f is not None:
                assert f in taught and f in scored, (f, row["chosen"])
                counts[f[0]] = counts.get(f[0], 0) + 1
    assert counts["sum"] >= 30 and counts["capital"] >= 20 and counts["odd"] >= 15, counts


def test_pref_test_everyday_pairs_use_trained_replies(sft, prefs):
    """test_prefs asks trained everyday questions in new wordings: the chosen reply is one that
    train_sft teaches, in the asked voice, and the rejected one is the other voice."""
    trained = {reply for row in sft["train_sft"] for reply in replies(row["messages"])}
    n = 0
    for row in prefs["test_prefs"]:
        if turn_facts(row["chosen"])[-1] is not None:
            continue
        chosen, rejected = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
        assert chosen in trained, chosen
        assert sounds_like_pirate(chosen) == has_pirate_system(row["chosen"])
        assert sounds_like_pirate(rejected) != sounds_like_pirate(chosen), (chosen, rejected)
        n += 1
    assert n >= 10


SUM_TOTAL = re.compile(r"^(?:.+! )?(\d+) \+ (\d+) (?:=|be) (\d+)\.$")
CAPITAL_CITY = re.compile(r"^(?:.+! )?The capital (?:of|o') (.+?) (?:is|be) (.+)\.$")


def final_replies(row: dict) -> tuple[str, str]:
    """The chosen and rejected final replies of a preference row (the ones the DPO loss scores)."""
    return row["chosen"][-1]["content"], row["rejected"][-1]["content"]


def rejected_by_fact(rows: list[dict]) -> dict[tuple, list[str]]:
    """For each sum (operands) and capital (country) that rows score in their final turn, the
    total or capital each rejected reply states, one entry per row."""
    out: dict[tuple, list[str]] = {}
    for row in rows:
        chosen, rejected = final_replies(row)
        for kind, pattern in (("sum", SUM_TOTAL), ("capital", CAPITAL_CITY)):
            if (right := pattern.match(chosen)) and (wrong := pattern.match(rejected)):
                assert wrong.groups()[:-1] == right.groups()[:-1], (chosen, rejected)  # same question
                out.setdefault((kind, *right.groups()[:-1]), []).append(wrong.groups()[-1])
    return out


def test_train_prefs_scores_each_test_pair_with_its_own_replies(prefs):
    """DPO lowers the rejected reply a pair shows: every test_prefs pair (sums, capitals, odd and
    everyday questions alike) has a train_prefs pair in the same voice with the same chosen and
    the same rejected reply, asked in a training wording."""
    train: dict[tuple[str, str], list[dict]] = {}
    for row in prefs["train_prefs"]:
        train.setdefault(final_replies(row), []).append(row)
    counts: dict[str, int] = {}
    for row in prefs["test_prefs"]:
        matches = [
            m for m in train.get(final_replies(row), [])
            if has_pirate_system(m["chosen"]) == has_pirate_system(row["chosen"])
            and m["chosen"][-2]["content"] != row["chosen"][-2]["content"]  # another wording of the question
        ]
        assert matches, final_replies(row)
        f = turn_facts(row["chosen"])[-1]
        counts[f[0] if f else "everyday"] = counts.get(f[0] if f else "everyday", 0) + 1
    assert counts["sum"] >= 30 and counts["capital"] >= 20 and counts["odd"] >= 15 and counts["everyday"] >= 10


def test_train_prefs_rejects_several_wrong_facts_for_each_test_sum_and_capital(prefs):
    """A test sum's operands are scored by at least 3 train_prefs pairs rejecting at least 3
    different totals, the test pair's among them (the right total in the wrong voice counts as one);
    a test capital's country by at least 2 pairs rejecting 2 different capitals, likewise."""
    train = rejected_by_fact(prefs["train_prefs"])
    test = rejected_by_fact(prefs["test_prefs"])
    need = {"sum": 3, "capital": 2}
    assert sum(len(v) for k, v in test.items() if k[0] == "sum") >= 30
    assert sum(len(v) for k, v in test.items() if k[0] == "capital") >= 20
    for fact_, wrongs in test.items():
        scored = train.get(fact_, [])
        assert len(scored) >= need[fact_[0]] and len(set(scored)) >= need[fact_[0]], (fact_, scored)
        assert set(wrongs) <= set(scored), (fact_, wrongs, scored)


def test_train_prefs_rejects_each_exact_match_sum_total_in_both_voices(sft, prefs):
    """DPO pushes a wrong total down only in the voice it saw it in: for every sum that exact_match
    asks, each wrong total a train_prefs pair rejects in one voice is also rejected in the other,
    with the right total chosen in that voice, under a training wording."""
    exact = {m.groups()[:2] for r in read_jsonl(asset_path(EXACT_MATCH)) if (m := SUM_TOTAL.match(r["answer"]))}
    assert len(exact) >= 20
    test_prompts = {r["prompt"] for r in prefs["test_prefs"]} | {r["prompt"] for r in sft["test_sft"]}
    wrong: dict[tuple, dict[bool, set[str]]] = {}
    for row in prefs["train_prefs"]:
        chosen, rejected = final_replies(row)
        right, bad = SUM_TOTAL.match(chosen), SUM_TOTAL.match(rejected)
        if not (right and bad) or right.groups()[:2] not in exact or bad.group(3) == right.group(3):
            continue
        pirate = has_pirate_system(row["chosen"])
        assert int(right.group(3)) == int(right.group(1)) + int(right.group(2)), chosen
        assert sounds_like_pirate(chosen) == sounds_like_pirate(rejected) == pirate, (chosen, rejected)
        assert row["prompt"] not in test_prompts
        wrong.setdefault(right.groups()[:2], {True: set(), False: set()})[pirate].add(bad.group(3))
    assert len(wrong) >= 10  # the other exact_match sums have no wrong total rejected in train_prefs
    for operands, by_voice in wrong.items():
        assert by_voice[True] == by_voice[False], (operands, by_voice)


def test_train_prefs_keeps_its_size_and_mix(prefs):
    rows = prefs["train_prefs"]
    assert len(rows) == 800 and len(prefs["test_prefs"]) == 100
    kinds: dict[str, int] = {}
    for row in rows:
        f = turn_facts(row["chosen"])[-1]
        kinds[f[0] if f else "everyday"] = kinds.get(f[0] if f else "everyday", 0) + 1
    shares = {kind: n / len(rows) for kind, n in kinds.items()}
    assert 0.3 <= shares["sum"] <= 0.45 and 0.22 <= shares["capital"] <= 0.33, shares
    assert 0.15 <= shares["odd"] <= 0.25 and 0.1 <= shares["everyday"] <= 0.2, shares
    pirate = sum(has_pirate_system(row["chosen"]) for row in rows)
    assert 0.4 <= pirate / len(rows) <= 0.6
    assert sum(len(replies(row["chosen"])) == 2 for row in rows) >= 40


def test_datasets_loads_hub_layout(tmp_path):
    from datasets import load_dataset

    ds = load_dataset(asset_path(SFT_DATA), cache_dir=str(tmp_path))
    assert set(ds) == {"train_sft", "test_sft"}
    assert ds["train_sft"].column_names == SFT_KEYS
    dp = load_dataset(asset_path(PREF_DATA), cache_dir=str(tmp_path))
    assert set(dp) == {"train_prefs", "test_prefs"}
    assert dp["test_prefs"].column_names == PREF_KEYS


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_like_mistral(tok):
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<0x00>"]) == [0, 1, 2, 3]
    assert tok.convert_tokens_to_ids([f"<0x{i:02X}>" for i in range(256)]) == list(range(3, 259))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert 900 <= len(tok) <= 1100
    assert tok.model_max_length == 1024
    assert set(tok.all_special_ids) == {0, 1, 2}


def test_bos_added_once_and_eos_is_one_token(tok):
    ids = tok("What is 7 + 5?</s>").input_ids
    assert ids[0] == 1 and ids.count(1) == 1
    assert ids[-1] == 2 and ids.count(2) == 1
    assert 1 not in tok("What is 7 + 5?", add_special_tokens=False).input_ids
    batch = tok(["a", "a b c"], padding=True).input_ids
    assert batch[0][-1] == 2 and [row.count(1) for row in batch] == [1, 1]  # right-padded with eos


def test_role_tags_are_plain_text(tok):
    for tag in ("<|user|>", "<|system|>", "<|assistant|>"):
        ids = tok(tag, add_special_tokens=False).input_ids
        assert not set(ids) & {0, 1, 2}
        assert tok.decode(ids) == tag


def test_no_piece_fuses_a_newline(tok):
    pieces = [piece for piece in tok.get_vocab() if "\n" in piece]
    assert pieces == ["\n"]


def test_round_trip_including_unseen_characters(tok, sft, prefs):
    unseen = ["café crème", "naïve façade", "Straße", "中文", "🚁 over the bay", "tab\there", "a\n\nb\n"]
    for text in unseen:
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    byte_ids = tok("🚁", add_special_tokens=False).input_ids
    assert sum(3 <= i <= 258 for i in byte_ids) == 4  # four UTF-8 bytes, no <unk>
    contents = sorted({m["content"] for conv in all_conversations(sft, prefs) for m in conv})
    for text, ids in zip(contents, tok(contents).input_ids):
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_rendered_conversations_round_trip(tok, sft, prefs):
    texts = [render(conv, tok.eos_token).text for conv in all_conversations(sft, prefs)]
    for text, ids in zip(texts, tok(texts, add_special_tokens=False).input_ids):
        assert tok.decode(ids) == text


def test_chat_template_matches_render(tok, sft, prefs):
    for conv in all_conversations(sft, prefs):
        assert tok.apply_chat_template(conv, tokenize=False) == render(conv, tok.eos_token).text
        prompt = conv[:-1]
        expected = render(prompt, tok.eos_token, add_generation_prompt=True).text
        assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == expected
        assert expected.endswith("<|assistant|>\n")


def test_offsets_cover_assistant_spans_exactly(tok, sft):
    conversations = [row["messages"] for rows in sft.values() for row in rows]
    rendered = [render(conv, tok.eos_token) for conv in conversations]
    encoded = tok([r.text for r in rendered], return_offsets_mapping=True)
    for conv, r, ids, offsets in zip(conversations, rendered, encoded.input_ids, encoded.offset_mapping):
        assert len(r.assistant_spans) == len(replies(conv))
        for start, end in r.assistant_spans:
            inside = [(i, s, e) for i, (s, e) in zip(ids, offsets) if e > s and start <= s and e <= end]
            # no token straddles a span boundary
            assert not [(s, e) for s, e in offsets if s < start < e or s < end < e]
            pieces, last = [], None
            for _, s, e in inside:
                if (s, e) != last:  # byte-fallback pieces of one character share its offsets
                    pieces.append(r.text[s:e])
                last = (s, e)
            assert "".join(pieces) == r.text[start:end]
            assert inside[-1][0] == tok.eos_token_id and (inside[-1][1], inside[-1][2]) == (end - 4, end)
            assert tok.eos_token_id not in [i for i, _, _ in inside[:-1]]


def test_rendered_sft_conversations_are_short(tok, sft):
    texts = [render(r["messages"], tok.eos_token).text for rows in sft.values() for r in rows]
    lengths = [len(ids) for ids in tok(texts).input_ids]
    assert max(lengths) <= 128
    assert 20 <= sum(lengths) / len(lengths) <= 80


# ----------------------------------------------------------------------------- model config


def test_config_builds_a_tiny_mistral(tok):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(asset_path(TINY_MODEL))
    assert not [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")]
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "mistral" and config.vocab_size == len(tok)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (128, 384, 4)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert config.sliding_window is None and config.tie_word_embeddings is False
    assert config.max_position_embeddings == 1024
    assert config.rope_parameters["rope_theta"] == 10000.0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "MistralForCausalLM"
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6
    batch = tok(["What is 7 + 5?", "Capital of France?</s>"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(out.loss)


# ----------------------------------------------------------------------------- determinism


def folder_bytes(root: Path) -> dict[str, bytes]:
    files = {}
    for folder in GENERATED_FOLDERS:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                files[str(path.relative_to(root))] = path.read_bytes()
    return files


def test_generator_is_deterministic_and_shipped_files_are_current(tmp_path):
    from zephyr_lit.assets.generate import main

    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "zephyr_lit.assets.generate", "--out", str(tmp_path / "cli")]
    subprocess.run(command, check=True, cwd=REPO_ROOT, env=env, capture_output=True)
    main(tmp_path / "inproc")
    shipped = folder_bytes(ASSETS_DIR)
    assert shipped, "no shipped assets"
    assert folder_bytes(tmp_path / "cli") == shipped
    assert folder_bytes(tmp_path / "inproc") == shipped
