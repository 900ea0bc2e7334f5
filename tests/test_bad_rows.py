"""``data.bad_rows=drop``: malformed rows of real data are dropped before any model loads, counted by
reason in ``summary.json`` and listed one per line in ``dropped_rows.jsonl``; past
``data.max_bad_fraction`` of a split, one line names the first few. ``error`` (the default) keeps the
one-line error of ``tests/test_bad_input.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import zephyr_lit.modules.dpo as dpo_module
import zephyr_lit.adapters as adapters
from tests.test_bad_input import GOOD, write_split
from zephyr_lit.assets import TINY_MODEL, asset_path
from zephyr_lit.errors import DataError
from zephyr_lit.run import prepare_run, train

EMPTY_REPLY = {**GOOD, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}
NO_REPLY = {**GOOD, "messages": [{"role": "user", "content": "hi"}]}


def sft_folder(tmp_path: Path, train_rows: list[dict]) -> Path:
    folder = tmp_path / "sft_data"
    write_split(folder, "train_sft", train_rows)
    write_split(folder, "test_sft", [GOOD, NO_REPLY, GOOD])
    return folder


def pair(prompt: str, chosen: str, rejected: str) -> dict:
    user = {"role": "user", "content": prompt}
    return {"prompt": prompt, "prompt_id": prompt, "chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}]}


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the data was checked")
    monkeypatch.setattr(adapters, "build_model", refuse)  # every trained model is built there
    monkeypatch.setattr(dpo_module, "build_model", refuse)


def test_dropped_rows_are_counted_and_listed_before_any_model(make_cfg, tmp_path, no_model):
    rows = [GOOD] * 6 + [EMPTY_REPLY, GOOD, NO_REPLY, GOOD]  # rows 6 and 8 of train_sft are bad
    folder = sft_folder(tmp_path, rows)
    run = prepare_run(make_cfg(f"data.path={folder}", "data.bad_rows=drop", "data.max_bad_fraction=0.4",
                               "data.exact_match_path=null", fast=False))
    stats = run.datamodule.stats
    assert stats["train_sft"].bad_rows == {"empty_assistant": 1, "no_assistant": 1}
    assert stats["train_sft"].rows == 10 and len(run.datamodule.train_set) == 8 and stats["train_sft"].dropped == 0
    assert stats["test_sft"].bad_rows == {"no_assistant": 1} and len(run.datamodule.val_set) == 2
    listed = [json.loads(line) for line in (run.output_dir / "dropped_rows.jsonl").read_text().splitlines()]
    source = str(folder / "data" / "train_sft-00000-of-00001.jsonl")
    assert [(r["split"], r["row"], r["field"], r["reason"]) for r in listed] == [
        ("train_sft", 6, "messages[1].content", "empty_assistant"), ("train_sft", 8, "messages", "no_assistant"),
        ("test_sft", 1, "messages", "no_assistant")]
    assert listed[0]["file"] == source and listed[0]["message"].startswith(f"{source} split 'train_sft' row 6:")


def test_more_bad_rows_than_the_fraction_is_one_line_naming_the_first(make_cfg, tmp_path, no_model):
    folder = sft_folder(tmp_path, [GOOD] * 6 + [EMPTY_REPLY, GOOD, NO_REPLY, GOOD])
    with pytest.raises(DataError) as error:
        prepare_run(make_cfg(f"data.path={folder}", "data.bad_rows=drop", "data.max_bad_fraction=0.1",
                             "data.exact_match_path=null", fast=False))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{folder / 'data' / 'train_sft-00000-of-00001.jsonl'} split 'train_sft': 2 of 10 rows "
                              "are bad (20.00% > data.max_bad_fraction=0.1); first: ")
    assert "row 6: field 'messages[1].content' is an empty assistant turn" in message and "row 8:" in message


def test_error_stays_the_default_with_its_one_line(make_cfg, tmp_path, no_model):
    folder = sft_folder(tmp_path, [GOOD] * 3 + [EMPTY_REPLY])
    with pytest.raises(DataError, match=r"split 'train_sft' row 3: field 'messages\[1\].content' is an empty "):
        prepare_run(make_cfg(f"data.path={folder}", "data.exact_match_path=null", fast=False))


def test_preference_rows_with_two_prompts_are_dropped_and_the_run_trains(make_cfg, tmp_path):
    good = [pair(f"What is {i} + 1?", f"{i} + 1 = {i + 1}.", "No idea.") for i in range(15)]
    mismatch = pair("What is 2 + 2?", "4.", "5.")
    mismatch["rejected"][0] = {"role": "user", "content": "What is 3 + 3?"}
    folder = tmp_path / "prefs"
    write_split(folder, "train_prefs", good[:7] + [mismatch] + good[7:])
    write_split(folder, "test_prefs", good[:4])
    cfg = make_cfg("+experiment=ddpo", f"model.name_or_path={asset_path(TINY_MODEL)}", "model.random_init=true",
                   f"data.path={folder}", "data.bad_rows=drop", "data.max_bad_fraction=0.1", "data.batch_size=3",
                   "data.exact_match_path=null", "trainer.max_steps=2", fast=False)
    summary = train(cfg, update_latest=False)
    assert summary["data"]["train_prefs"]["bad_rows"] == {"prompt_mismatch": 1}
    assert summary["data"]["train_prefs"]["pairs"] == 15 and summary["global_step"] == 2
    listed = [json.loads(line) for line in (Path(cfg.paths.output_dir) / "dropped_rows.jsonl").read_text().splitlines()]
    assert [(r["row"], r["field"]) for r in listed] == [(7, "rejected[0].content")]


@pytest.mark.slow
def test_two_ranks_drop_the_same_rows_and_one_list_is_written(tmp_path, hf_cache):
    from tests.distributed.train_py import train_py

    folder = sft_folder(tmp_path, [GOOD] * 6 + [EMPTY_REPLY, GOOD, NO_REPLY, GOOD])
    out = tmp_path / "run"
    code = train_py([f"paths.root={tmp_path / 'outputs'}", f"paths.output_dir={out}", f"data.cache_dir={hf_cache}",
                     f"data.path={folder}", "data.bad_rows=drop", "data.max_bad_fraction=0.4",
                     "data.exact_match_path=null", "data.batch_size=2", "trainer.max_steps=2", "logger=csv",
                     "trainer.enable_progress_bar=false", "+callbacks.facts._target_=tests.distributed.data_facts.DataFacts",
                     f"+callbacks.facts.out_dir={tmp_path / 'facts'}"], tmp_path / "run.log", ranks=2)
    assert code == 0, (tmp_path / "run.log").read_text()[-3000:]
    ranks = [json.loads((tmp_path / "facts" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["train_rows"] == 8 and ranks[0]["val_rows"] == 2
    listed = [json.loads(line) for line in (out / "dropped_rows.jsonl").read_text().splitlines()]
    assert listed == ranks[0]["dropped_rows"] and len(listed) == 3
    assert json.loads((out / "summary.json").read_text())["data"]["train_sft"]["bad_rows"] == {
        "empty_assistant": 1, "no_assistant": 1}
