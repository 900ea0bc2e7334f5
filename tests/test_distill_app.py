"""``python -m zephyr_lit.distill``: the stages on the embedded prompts, the config checks, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import compose_config
from zephyr_lit.data.load import load_split
from zephyr_lit.distill.app import distill
from zephyr_lit.distill.binarize import SPLITS
from zephyr_lit.distill.store import split_path
from zephyr_lit.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def cfg(tmp_path: Path, hf_cache: Path, *overrides: str):
    return compose_config([f"output_dir={tmp_path / 'out'}", f"cache_dir={hf_cache}", *overrides], "distill")


def rows(folder: Path, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in split_path(folder, split).read_text().splitlines()]


def test_the_feedback_pipeline_writes_the_three_hub_layouts(tmp_path, hf_cache):
    """100 embedded test prompts -> UltraFeedback rows with 4 rated completions -> binarized pairs
    (20 to test), each folder readable by the training data loader."""
    results = distill(cfg(tmp_path, hf_cache, "+pipeline=feedback", "input_split=test_prefs", "binarize.test_size=20"))
    out = tmp_path / "out"
    assert results["completions"]["prompts"] == 100 and results["completions"]["completions"] == 400
    completion_rows = rows(out / "completions")
    first = completion_rows[0]
    assert set(first) >= {"source", "instruction", "models", "completions", "prompt_id", "messages"}
    assert len(first["models"]) == 4 == len(set(first["models"]))  # 4 different pool members
    assert set(first["completions"][0]) == {"model", "principle", "custom_system_prompt", "response", "annotations",
                                            "fine-grained_score", "overall_score", "critique"}
    rated = rows(out / "rated")[0]["completions"][0]
    assert set(rated["annotations"]) == {"instruction_following", "honesty", "truthfulness", "helpfulness"}
    assert set(rated["annotations"]["truthfulness"]) == {"Type", "Rationale", "Rating", "Rationale For Rating"}
    ratings = [int(a["Rating"]) for a in rated["annotations"].values()]
    assert rated["fine-grained_score"] == pytest.approx(sum(ratings) / 4)
    for split in SPLITS:
        loaded = load_split(str(out / "prefs"), split, cache_dir=str(hf_cache)).dataset
        assert len(loaded) == (20 if split.startswith("test") else 80)
    pair = rows(out / "prefs", "train_prefs")[0]
    assert pair["messages"] == pair["chosen"] and pair["score_chosen"] >= pair["score_rejected"]
    assert rows(out / "prefs", "train_gen")[0]["messages"] == pair["chosen"][:-1]
    manifest = json.loads((out / "prefs" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["pairs"] == 100


def test_a_pool_smaller_than_n_and_bad_options_are_one_config_error(tmp_path, hf_cache):
    config = cfg(tmp_path, hf_cache, "+pipeline=feedback", "completions.n=6", "binarize.ties=maybe", "rate.aspects=[tone]",
                 "input=/does/not/exist")
    with pytest.raises(ConfigError) as error:
        distill(config)
    message = str(error.value)
    assert "fewer than completions.n=6" in message and "binarize.ties='maybe'" in message and "tone" in message
    assert not (tmp_path / "out").exists()  # nothing read, nothing written


def test_a_later_stage_needs_an_input(tmp_path, hf_cache):
    with pytest.raises(ConfigError, match="stage=rate needs input="):
        distill(cfg(tmp_path, hf_cache, "stage=rate"))


def test_a_bad_prompt_row_names_file_split_row_and_field(tmp_path, hf_cache):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"instruction": "Capital of Chile?"}\n{"messages": [{"role": "user", "content": 3}]}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl split 'train' row 1: field 'messages\[0\]'"):
        distill(cfg(tmp_path, hf_cache, f"input={bad}"))


def test_a_folder_of_other_settings_is_refused_and_the_same_one_is_left_alone(tmp_path, hf_cache):
    config = cfg(tmp_path, hf_cache, "input_split=test_prefs", "completions.n=2")
    distill(config)
    before = split_path(tmp_path / "out", "train").read_bytes()
    assert distill(config)["completions"]["prompts"] == 100  # already complete: nothing redone
    assert split_path(tmp_path / "out", "train").read_bytes() == before
    with pytest.raises(ConfigError, match=r"other settings \(seed\)"):
        distill(cfg(tmp_path, hf_cache, "input_split=test_prefs", "completions.n=2", "seed=7"))


def test_questions_from_a_text_file_and_duplicates_merged(tmp_path, hf_cache):
    questions = tmp_path / "questions.txt"
    questions.write_text("Capital of Chile?\nHow much is 2 plus 1?\nCapital of Chile?\n\n")
    counts = distill(cfg(tmp_path, hf_cache, f"input={questions}"))["completions"]
    assert counts["prompts"] == 2 and counts["duplicates"] == 1 and counts["failed"] == 0
    assert [r["instruction"] for r in rows(tmp_path / "out")] == ["Capital of Chile?", "How much is 2 plus 1?"]


def test_the_command_line_prints_its_config_and_a_bad_key_is_one_line(tmp_path):
    shown = subprocess.run([sys.executable, "-m", "zephyr_lit.distill", "--cfg", "job", "judge=openai"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "OpenAIBackend" in shown.stdout and "api_key_env: OPENAI_API_KEY" in shown.stdout
    failed = subprocess.run([sys.executable, "-m", "zephyr_lit.distill", "completions.n=9", f"output_dir={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and failed.stderr.strip().count("\n") == 0
    assert failed.stderr.startswith("error: ") and "completions.n=9" in failed.stderr


def test_a_local_hf_judge_runs_and_its_unreadable_replies_are_counted(tmp_path, hf_cache):
    """judge=hf on a random-init tiny model: every reply is noise, so each aspect is asked 1 + retries
    times and left unrated; the stage still finishes and says so."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from zephyr_lit.assets import asset_path
    from zephyr_lit.chat import ZEPHYR_CHAT_TEMPLATE

    folder = tmp_path / "judge"
    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny-mistral"))
    tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(asset_path("tiny-mistral"))).save_pretrained(folder)
    questions = tmp_path / "q.txt"
    questions.write_text("Capital of Chile?\nHow much is 2 plus 1?\n")
    distill(cfg(tmp_path, hf_cache, f"input={questions}", "completions.n=2"))
    rated = tmp_path / "rated"
    counts = distill(compose_config([f"output_dir={rated}", f"cache_dir={hf_cache}", "stage=rate", f"input={tmp_path / 'out'}",
                                     "judge=hf", f"judge.backend.name_or_path={folder}", "judge.backend.dtype=float32",
                                     "judge.max_new_tokens=4", "judge.retries=1"], "distill"))["rate"]
    assert counts["unrated"] == 2 * 4 and counts["parse_retries"] == 2 * 4 and counts["failed"] == 0
    assert all(c["annotations"] is None for c in rows(rated)[0]["completions"])
