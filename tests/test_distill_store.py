"""A stage's output folder: appended records survive a kill, a folder of other settings is refused."""

from __future__ import annotations

import json

import pytest

from zephyr_lit.distill.store import StageOutput, StageStore, settings_hash, split_path
from zephyr_lit.errors import ConfigError

SETTINGS = {"seed": 1, "judge": {"backend": {"model": "gpt-4", "max_concurrency": 8, "timeout": 60}, "retries": 2}}


def test_the_hash_leaves_out_concurrency_retries_and_timeouts_only():
    faster = {"seed": 1, "judge": {"backend": {"model": "gpt-4", "max_concurrency": 64, "timeout": 5}, "retries": 9}}
    assert settings_hash(faster) == settings_hash(SETTINGS)
    assert settings_hash({**SETTINGS, "seed": 2}) != settings_hash(SETTINGS)
    other_model = {"seed": 1, "judge": {"backend": {"model": "gpt-4o", "max_concurrency": 8}}}
    assert settings_hash(other_model) != settings_hash(SETTINGS)


def test_records_are_appended_and_a_torn_last_line_is_cut(tmp_path):
    store = StageStore(tmp_path / "out", "rate", SETTINGS)
    assert store.open() is False
    store.append([{"key": "a", "unit": 1}, {"key": "b", "unit": 2}])
    with open(store.records_path, "a", encoding="utf-8") as handle:
        handle.write('{"key": "c", "un')  # killed mid-append
    again = StageStore(tmp_path / "out", "rate", SETTINGS)
    assert again.open() is False
    assert again.done() == [{"key": "a", "unit": 1}, {"key": "b", "unit": 2}]
    again.append([{"key": "c", "unit": 3}])
    assert [r["key"] for r in again.done()] == ["a", "b", "c"]


def test_a_folder_written_under_other_settings_is_refused_naming_what_differs(tmp_path):
    StageStore(tmp_path, "rate", SETTINGS).open()
    with pytest.raises(ConfigError, match=r"other settings \(seed\)"):
        StageStore(tmp_path, "rate", {**SETTINGS, "seed": 2}).open()
    with pytest.raises(ConfigError, match="stage=rate"):
        StageStore(tmp_path, "binarize", SETTINGS).open()
    assert StageStore(tmp_path, "rate", {**SETTINGS, "judge": {**SETTINGS["judge"], "retries": 5}}).open() is False


def test_a_folder_with_other_files_and_no_manifest_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="no manifest.json"):
        StageStore(tmp_path, "rate", SETTINGS).open()


def test_finish_writes_the_splits_then_marks_the_folder_complete(tmp_path):
    store = StageStore(tmp_path, "binarize", SETTINGS)
    store.open()
    store.finish(StageOutput({"train_prefs": [{"x": 1}], "test_prefs": []}, {"pairs": 1}))
    assert [json.loads(line) for line in split_path(tmp_path, "train_prefs").read_text().splitlines()] == [{"x": 1}]
    assert split_path(tmp_path, "test_prefs").read_text() == ""
    assert store.manifest()["status"] == "complete" and store.manifest()["counts"] == {"pairs": 1}
    assert StageStore(tmp_path, "binarize", SETTINGS).open() is True  # nothing left to do


def test_an_unfinished_stage_stays_open_for_a_rerun(tmp_path):
    store = StageStore(tmp_path, "completions", SETTINGS)
    store.open()
    store.finish(StageOutput({"train": []}, {"failed": 3}), complete=False)
    assert store.manifest()["status"] == "running"
    assert StageStore(tmp_path, "completions", SETTINGS).open() is False


def test_each_rank_appends_to_its_own_part_and_reads_every_part(tmp_path):
    main, second = StageStore(tmp_path, "dialogues", SETTINGS), StageStore(tmp_path, "dialogues", SETTINGS, rank=1)
    assert main.check() is False and second.check() is False  # read-only: nothing claimed yet
    assert not (tmp_path / "manifest.json").exists()
    main.claim()
    main.append([{"key": "a"}])
    second.append([{"key": "b"}, {"key": "c"}])
    with open(second.records_path, "a", encoding="utf-8") as handle:
        handle.write('{"key": "d"')  # rank 1 killed mid-append
    assert second.records_path.name == "records.rank1.jsonl"
    assert [r["key"] for r in main.done()] == ["a", "b", "c"]  # the torn line is skipped, not cut, by rank 0
    assert second.records_path.read_text().endswith('{"key": "d"')
    assert [r["key"] for r in second.done()] == ["b", "c", "a"]  # its own part first, cut
    assert second.records_path.read_text().endswith('"c"}\n')
    main.finish(StageOutput({"train": []}, {}, files={"questions.txt": "one\ntwo\n"}))
    assert (tmp_path / "questions.txt").read_text() == "one\ntwo\n" and main.check() is True
