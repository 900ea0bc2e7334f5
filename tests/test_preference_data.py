"""Preference data: the pair conventions on exact token ids, collation, truncation, bad rows, caching."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

import zephyr_lit.data.preference as preference
from zephyr_lit.assets import TINY_MODEL, asset_path
from zephyr_lit.data.load import find_bad_json_row
from zephyr_lit.data.preference import PairTokens, PreferenceDataModule, collate_pairs, tokenize_pair, truncate_pair
from zephyr_lit.data.tokenize import IGNORE_INDEX as IGN
from zephyr_lit.errors import ConfigError, DataError
from zephyr_lit.models import ModelSpec, load_tokenizer
from tests.conftest import compose_config

USER = {"role": "user", "content": "What is 2 + 3?"}
PROMPT_PIECES = ["<s>", "▁<|system|>", "\n", "</s>", "\n",
                 "<|user|>", "\n", "What", "▁is", "▁2", "▁+", "▁3?", "</s>", "\n", "<|assistant|>", "\n"]


def pair(chosen: str = "2 + 3 = 5.", rejected: str = "It is 6.", prompt: list[dict] = (USER,)) -> dict:
    chosen_turns = [*prompt, {"role": "assistant", "content": chosen}]
    return {"prompt": prompt[-1]["content"], "prompt_id": "p0", "chosen": chosen_turns,
            "rejected": [*prompt, {"role": "assistant", "content": rejected}], "messages": chosen_turns,
            "score_chosen": 8.0, "score_rejected": 2.0}


GOOD = pair()
LONG = " ".join(["word"] * 200)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSpec(name_or_path=asset_path(TINY_MODEL)))


def write_split(folder: Path, split: str, rows: list) -> Path:
    path = folder / "data" / f"{split}-00000-of-00001.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepared(tmp_path, hf_cache, tokenizer, train_rows, **settings) -> PreferenceDataModule:
    folder = tmp_path / "prefs"
    write_split(folder, "train_prefs", train_rows)
    write_split(folder, "test_prefs", [GOOD])
    datamodule = PreferenceDataModule(path=str(folder), cache_dir=str(hf_cache), batch_size=2, **settings)
    datamodule.prepare(tokenizer)
    return datamodule


def test_pair_tokens_by_hand(tokenizer):
    tokens = tokenize_pair(GOOD["chosen"], GOOD["rejected"], tokenizer, max_length=256, max_prompt_length=128)
    pieces = tokenizer.convert_ids_to_tokens
    # The prompt owns the generation tag <|assistant|>\n; BOS (id 1) once, then the empty system turn.
    assert pieces(tokens.prompt_input_ids) == PROMPT_PIECES
    assert tokens.prompt_input_ids[:4] == [1, 388, 259, 2] and tokens.prompt_input_ids.count(1) == 1
    # Completions: the reply and its </s> (id 2 = eos = pad), no "\n" after it.
    assert pieces(tokens.chosen_input_ids) == ["2", "▁+", "▁3", "▁=", "▁5.", "</s>"]
    assert pieces(tokens.rejected_input_ids) == ["I", "t", "▁is", "▁6", ".", "</s>"]
    assert tokens.chosen_input_ids[-1] == tokens.rejected_input_ids[-1] == tokenizer.eos_token_id == 2
    # The text is the chat template's prompt + completion; the split is clean (prompt alone = same ids).
    prompt_text = tokenizer.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(GOOD["chosen"], tokenize=False) == prompt_text + "2 + 3 = 5.</s>\n"
    assert tokenizer(prompt_text)["input_ids"] == tokens.prompt_input_ids
    whole = tokenizer(prompt_text + "2 + 3 = 5.</s>")["input_ids"]
    assert whole == tokens.prompt_input_ids + tokens.chosen_input_ids
    assert not (tokens.prompt_truncated or tokens.chosen_truncated or tokens.rejected_truncated)


def test_collated_batch_by_hand():
    rows = [
        {"prompt_input_ids": [1, 10, 11], "chosen_input_ids": [20, 2], "rejected_input_ids": [30, 31, 32, 2], "index": 5},
        {"prompt_input_ids": [1, 12], "chosen_input_ids": [21, 2], "rejected_input_ids": [2], "index": 0},
    ]
    batch = collate_pairs(rows, pad_id=2, pad_to_multiple_of=8)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index", "counted", "num_tokens", "num_rows"}
    assert batch["counted"].tolist() == [True, True] and batch["num_rows"].item() == 4  # 2 pairs, 4 rows
    assert batch["input_ids"].tolist() == [
        [1, 10, 11, 20, 2, 2, 2, 2],     # pair 0, chosen
        [1, 12, 21, 2, 2, 2, 2, 2],      # pair 1, chosen
        [1, 10, 11, 30, 31, 32, 2, 2],   # pair 0, rejected
        [1, 12, 2, 2, 2, 2, 2, 2],       # pair 1, rejected
    ]
    assert batch["labels"].tolist() == [
        [IGN, IGN, IGN, 20, 2, IGN, IGN, IGN],
        [IGN, IGN, 21, 2, IGN, IGN, IGN, IGN],
        [IGN, IGN, IGN, 30, 31, 32, 2, IGN],
        [IGN, IGN, 2, IGN, IGN, IGN, IGN, IGN],  # </s> is labelled though it equals the pad id
    ]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 4 + [0] * 4, [1] * 7 + [0], [1] * 3 + [0] * 5]
    assert batch["index"].tolist() == [5, 0] and int(batch["num_tokens"]) == 19
    assert collate_pairs(rows, pad_id=2, pad_to_multiple_of=None)["input_ids"].shape == (4, 7)


def test_truncation_keeps_bos_and_the_end_of_the_prompt(tmp_path, hf_cache, tokenizer):
    system = {"role": "system", "content": "Be brief."}
    long_prompt = pair(prompt=[system, {"role": "user", "content": LONG}])
    long_reply = pair(chosen=LONG)
    datamodule = prepared(tmp_path, hf_cache, tokenizer, [GOOD, long_prompt, long_reply], max_length=64, max_prompt_length=32)
    stats = datamodule.stats["train_prefs"]
    assert (stats.rows, stats.pairs, stats.truncated_prompts, stats.truncated_completions, stats.dropped) == (3, 3, 1, 1, 0)
    rows = datamodule.train_set
    assert rows["index"] == [0, 1, 2]
    full = tokenize_pair(long_prompt["chosen"], long_prompt["rejected"], tokenizer, 10_000, None)
    cut = rows[1]["prompt_input_ids"]
    assert len(full.prompt_input_ids) > 32 == len(cut) == rows[1]["prompt_length"]
    assert cut == [1] + full.prompt_input_ids[-31:] and cut.count(1) == 1  # BOS once, then the prompt's end
    assert tokenizer.convert_ids_to_tokens(cut[-2:]) == ["<|assistant|>", "\n"]
    assert rows[1]["chosen_input_ids"] == full.chosen_input_ids  # the completion fits: untouched
    for row in rows:
        assert row["prompt_length"] <= 32 and row["prompt_input_ids"][0] == 1
        assert row["prompt_length"] + max(row["chosen_length"], row["rejected_length"]) <= 64
    # TRL's budget: the long reply is cut to max_length - max_prompt_length = 32, its short prompt kept whole.
    assert (rows[2]["prompt_length"], rows[2]["chosen_length"]) == (16, 32) and rows[2]["chosen_input_ids"][-1] != 2
    assert rows[2]["rejected_input_ids"][-1] == 2  # the short reply keeps its </s>

    # No separate prompt cap: a prompt that fills max_length leaves no completion token -> dropped, counted.
    uncapped = prepared(tmp_path, hf_cache, tokenizer, [GOOD, long_prompt, long_reply], max_length=32, max_prompt_length=None)
    stats = uncapped.stats["train_prefs"]
    assert (stats.pairs, stats.dropped_no_room, stats.dropped, stats.truncated_prompts, stats.truncated_completions) == (2, 1, 1, 0, 1)
    assert uncapped.train_set["index"] == [0, 1] and uncapped.train_set["prompt_length"] == [16, 16]


# truncate_pair by hand: BOS = 1, prompt ids 10.., chosen 20.., rejected 30.., </s> = 2.
PROMPT8 = [1, 10, 11, 12, 13, 14, 15, 16]
TRUNCATION_CASES = {
    # 6 + 3 <= 10: the pair fits, the prompt stays whole though it is longer than max_prompt_length.
    "fits": (([1, 10, 11, 12, 13, 14], [20, 21, 2], [30, 2], 10, 4),
             PairTokens([1, 10, 11, 12, 13, 14], [20, 21, 2], [30, 2], False, False, False)),
    # 8 + 4 > 10: BOS + the last 3 prompt tokens; then 4 + 4 <= 10, the completions stay whole.
    "prompt cut": ((PROMPT8, [20, 21, 22, 2], [30, 2], 10, 4),
                   PairTokens([1, 14, 15, 16], [20, 21, 22, 2], [30, 2], True, False, False)),
    # 4 + 8 > 10 after the prompt cut: both completions cut to 10 - 4 = 6 (the short one is already shorter).
    "completions cut too": ((PROMPT8, [20, 21, 22, 23, 24, 25, 26, 2], [30, 31, 2], 10, 4),
                            PairTokens([1, 14, 15, 16], [20, 21, 22, 23, 24, 25], [30, 31, 2], True, True, False)),
    # A prompt within max_prompt_length is not cut; the completions still get 10 - 4 = 6, not 10 - 3.
    "short prompt, long reply": (([1, 10, 11], [20, 21, 22, 23, 24, 25, 26, 27, 2], [30, 2], 10, 4),
                                 PairTokens([1, 10, 11], [20, 21, 22, 23, 24, 25], [30, 2], False, True, False)),
    # max_prompt_length null: the prompt is never cut, the completions get what it leaves (10 - 8 = 2).
    "no prompt cap": ((PROMPT8, [20, 21, 22, 2], [30, 2], 10, None),
                      PairTokens(PROMPT8, [20, 21], [30, 2], False, True, False)),
    "no prompt cap, no room": (([1, *range(10, 19)], [20, 2], [30, 2], 10, None),
                               PairTokens([1, *range(10, 19)], [], [], False, True, True)),
    # max_prompt_length >= max_length leaves the completions no budget: no room, the row is dropped.
    "cap above max_length": ((PROMPT8, [20, 21, 2], [30, 2], 10, 12),
                             PairTokens(PROMPT8, [], [], False, True, True)),
}


@pytest.mark.parametrize("case", list(TRUNCATION_CASES))
def test_truncate_pair_by_hand(case):
    (prompt, chosen, rejected, max_length, max_prompt_length), expected = TRUNCATION_CASES[case]
    inputs = [list(prompt), list(chosen), list(rejected)]
    tokens = truncate_pair(prompt, chosen, rejected, max_length, max_prompt_length, bos_id=1)
    assert tokens == expected
    assert tokens.fits == bool(expected.chosen_input_ids)  # False: _tokenize_rows drops the row as "no_room"
    assert [prompt, chosen, rejected] == inputs  # the inputs are not modified


def test_truncate_pair_without_bos_keeps_the_prompts_end():
    tokens = truncate_pair([10, 11, 12, 13, 14, 15, 16, 17], [20, 2], [30, 31, 32, 2], 10, 4, bos_id=None)
    assert tokens == PairTokens([14, 15, 16, 17], [20, 2], [30, 31, 32, 2], True, False, False)


def test_a_pair_that_fits_keeps_its_long_prompt(tmp_path, hf_cache, tokenizer):
    """The old rule cut every prompt over max_prompt_length; TRL's (and ours) only an overflowing pair's."""
    medium = pair(prompt=[{"role": "user", "content": " ".join(["word"] * 10)}])
    full = tokenize_pair(medium["chosen"], medium["rejected"], tokenizer, 10_000, None)
    assert len(full.prompt_input_ids) > 32 and len(full.prompt_input_ids) + len(full.chosen_input_ids) <= 64
    datamodule = prepared(tmp_path, hf_cache, tokenizer, [GOOD, medium], max_length=64, max_prompt_length=32)
    stats = datamodule.stats["train_prefs"]
    assert (stats.pairs, stats.truncated_prompts, stats.truncated_completions) == (2, 0, 0)
    assert datamodule.train_set[1]["prompt_input_ids"] == full.prompt_input_ids
    assert datamodule.train_set[1]["chosen_input_ids"] == full.chosen_input_ids


def test_identical_pairs_are_dropped_and_counted(tmp_path, hf_cache, tokenizer):
    other = pair(chosen="Five.", rejected="Four.")
    datamodule = prepared(tmp_path, hf_cache, tokenizer, [GOOD, pair(rejected=GOOD["chosen"][-1]["content"]), other])
    stats = datamodule.stats["train_prefs"]
    assert (stats.rows, stats.pairs, stats.dropped_identical, stats.dropped) == (3, 2, 1, 1)
    assert datamodule.train_set["index"] == [0, 1]  # renumbered after the drop
    expected = tokenize_pair(other["chosen"], other["rejected"], tokenizer, 1024, 512)
    assert datamodule.train_set[1]["chosen_input_ids"] == expected.chosen_input_ids
    assert datamodule.summary_stats()["train_prefs"]["dropped_identical"] == 1


ASSISTANT = {"role": "assistant", "content": "5"}
CASES = {
    "chosen is null": ({**GOOD, "chosen": None}, r"field 'chosen' is missing"),
    "rejected not a list": ({**GOOD, "rejected": "hello"}, r"field 'rejected' must be a list"),
    "unknown role": ({**GOOD, "chosen": [{"role": "bot", "content": "hi"}, ASSISTANT]},
                     r"field 'chosen\[0\].role' is 'bot'; expected one of system, user, assistant"),
    "not ending with an assistant turn": (
        {**GOOD, "chosen": [USER, ASSISTANT, USER], "rejected": [USER, ASSISTANT, USER]},
        r"field 'chosen' must end with an assistant turn \(the completion\); its last turn is 'user'"),
    "two different prompts": ({**GOOD, "rejected": [{"role": "user", "content": "2 + 4?"}, ASSISTANT]},
                              r"field 'rejected\[0\].content' differs from 'chosen\[0\].content': two different prompts"),
    "different prompt turns": ({**GOOD, "rejected": [{"role": "system", "content": ""}, USER, ASSISTANT]},
                               r"field 'rejected' has 2 prompt turns, 'chosen' has 1: two different prompts"),
    "empty completion": ({**GOOD, "rejected": [USER, {"role": "assistant", "content": " "}]},
                         r"field 'rejected\[1\].content' is an empty assistant turn"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_rows_name_file_split_row_and_field(case, tmp_path, hf_cache, tokenizer):
    row, message = CASES[case]
    train_file = tmp_path / "prefs" / "data" / "train_prefs-00000-of-00001.jsonl"
    with pytest.raises(DataError, match=rf"^{train_file} split 'train_prefs' row 2: {message}") as info:
        prepared(tmp_path, hf_cache, tokenizer, [GOOD, GOOD, row, GOOD])
    assert "\n" not in str(info.value)
    # The JSON fallback of load_split (for files Arrow cannot read) runs the very same checks.
    with pytest.raises(DataError, match=rf"^{train_file} split 'train_prefs' row 2: {message}"):
        find_bad_json_row([train_file], "train_prefs", preference._check_row)


def test_missing_column_is_named(tmp_path, hf_cache, tokenizer):
    rows = [{k: v for k, v in GOOD.items() if k != "rejected"}] * 2
    train_file = tmp_path / "prefs" / "data" / "train_prefs-00000-of-00001.jsonl"
    with pytest.raises(DataError, match=rf"^{train_file} split 'train_prefs' row 0: field 'rejected' is missing \(columns: "):
        prepared(tmp_path, hf_cache, tokenizer, rows)


@pytest.fixture(scope="module")
def embedded(hf_cache, tokenizer) -> PreferenceDataModule:
    cfg = compose_config(["data=ultrafeedback_tiny", f"data.cache_dir={hf_cache}"])
    datamodule = instantiate(cfg.data)
    datamodule.prepare(tokenizer)
    return datamodule


def test_embedded_data_prepares_and_loads(embedded):
    assert embedded.summary_stats() == {
        "train_prefs": {"rows": 800, "pairs": 800, "truncated_prompts": 0, "truncated_completions": 0,
                        "dropped_identical": 0, "dropped_no_room": 0, "dropped": 0, "completion_tokens": 26702, "bad_rows": {}},
        "test_prefs": {"rows": 100, "pairs": 100, "truncated_prompts": 0, "truncated_completions": 0,
                       "dropped_identical": 0, "dropped_no_room": 0, "dropped": 0, "completion_tokens": 3421, "bad_rows": {}},
    }
    assert embedded.exact_match and embedded.train_set["index"] == list(range(800))
    batches = list(embedded.train_dataloader())
    assert len(batches) == 800 // 16
    batch = batches[0]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 32 and batch["input_ids"].shape[1] % 8 == 0 and batch["index"].shape == (16,)
    trained = batch["labels"] != IGN
    assert torch.equal(batch["labels"][trained], batch["input_ids"][trained])
    assert int(batch["attention_mask"].sum()) == int(batch["num_tokens"])
    row = embedded.train_set[int(batch["index"][3])]
    n = row["prompt_length"] + row["rejected_length"]
    assert batch["input_ids"][16 + 3, :n].tolist() == row["prompt_input_ids"] + row["rejected_input_ids"]
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(800))  # each pair once per epoch
    assert [len(b["index"]) for b in embedded.val_dataloader()] == [64, 36]


def test_loaders_shard_per_rank(embedded):
    try:
        per_rank = {}
        for rank in range(3):
            embedded.trainer = SimpleNamespace(world_size=3, global_rank=rank, accumulate_grad_batches=1,
                                               num_devices=3, num_nodes=1)
            precompute = [i for b in embedded.precompute_dataloader("train") for i in b["index"].tolist()]
            train = [i for b in embedded.train_dataloader() for i in b["index"].tolist()]
            per_rank[rank] = precompute, train
        precomputed = [p for p, _ in per_rank.values()]
        assert [len(p) for p in precomputed] == [267, 267, 267]  # equal sizes for the all_gather
        assert sorted(set(sum(precomputed, []))) == list(range(800)) and precomputed[0][:3] == [0, 1, 2]
        trains = [t for _, t in per_rank.values()]
        assert [len(t) for t in trains] == [16 * 16] * 3 and len(set(sum(trains, []))) == 3 * 256
        assert len([b for b in embedded.precompute_dataloader("test_prefs")]) == 1
    finally:
        embedded.trainer = None


def test_second_prepare_hits_the_tokenisation_cache(tmp_path, tokenizer, monkeypatch):
    folder = asset_path("data/ultrafeedback_tiny")
    first = PreferenceDataModule(path=folder, cache_dir=str(tmp_path / "cache"), max_length=256, max_prompt_length=128)
    first.prepare(tokenizer)
    files = [f["filename"] for f in first.train_set.cache_files]
    assert files and all(str(tmp_path / "cache") in f for f in files)

    calls = []
    real = preference.tokenize_pair
    monkeypatch.setattr(preference, "tokenize_pair", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = PreferenceDataModule(path=folder, cache_dir=str(tmp_path / "cache"), max_length=256, max_prompt_length=128)
    second.prepare(tokenizer)
    assert calls == []  # nothing tokenised again
    assert [f["filename"] for f in second.train_set.cache_files] == files
    assert second.train_set["chosen_input_ids"] == first.train_set["chosen_input_ids"]

    changed = PreferenceDataModule(path=folder, cache_dir=str(tmp_path / "cache"), max_length=256, max_prompt_length=64)
    changed.prepare(tokenizer)
    assert calls  # a length setting changes the fingerprint
    assert [f["filename"] for f in changed.train_set.cache_files] != files


def test_global_batch_size_is_checked(caplog):
    datamodule = PreferenceDataModule(path="unused", batch_size=8, global_batch_size=64)
    datamodule.trainer = SimpleNamespace(world_size=4, global_rank=0, accumulate_grad_batches=1, num_devices=2, num_nodes=2)
    with pytest.raises(ConfigError, match=(
        r"^data.global_batch_size=64 but data.batch_size=8 x world size 4 \(trainer.devices=2 x trainer.num_nodes=2\) "
        r"x trainer.accumulate_grad_batches=1 = 32 pairs per optimizer step; change data.batch_size, trainer.devices, "
        r"trainer.num_nodes or trainer.accumulate_grad_batches")):
        datamodule.train_dataloader()
    datamodule.trainer.accumulate_grad_batches = 2
    with caplog.at_level(logging.INFO, logger="zephyr_lit.data.base"):
        assert datamodule.check_global_batch_size() == 64
    assert "= 64 pairs per optimizer step (= data.global_batch_size)" in caplog.text
    from zephyr_lit.config import config_problems

    ddpo = ["+experiment=ddpo", "model.name_or_path=${asset:tiny-mistral}"]
    assert "data.max_prompt_length=1: must be >= 2 (BOS and one token) or null" in config_problems(
        compose_config([*ddpo, "data.max_prompt_length=1"]))
    assert any(p.startswith("data.max_prompt_length=64: must be < data.max_length=64") for p in config_problems(
        compose_config([*ddpo, "data.max_length=64", "data.max_prompt_length=64"])))


def test_real_data_config_composes():
    cfg = compose_config(["data=ultrafeedback_binarized"])
    datamodule = instantiate(cfg.data)
    assert (datamodule.path, datamodule.train_split, datamodule.test_split) == (
        "HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "test_prefs")
    assert (datamodule.max_length, datamodule.max_prompt_length, datamodule.batch_size, datamodule.num_proc) == (1024, 512, 8, 8)
    assert datamodule.exact_match_path is None and datamodule.seed == cfg.seed
