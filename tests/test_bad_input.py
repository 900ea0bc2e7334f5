"""Bad data and bad config: one clear line naming file, split, row and field, before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

import zephyr_lit.adapters as adapters
from zephyr_lit.errors import ConfigError, DataError
from zephyr_lit.run import train

GOOD = {"prompt": "What is 1 + 1?", "prompt_id": "p0", "messages": [
    {"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "1 + 1 = 2."}]}


def write_split(folder: Path, split: str, rows: list) -> Path:
    path = folder / "data" / f"{split}-00000-of-00001.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if a model gets built: data errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the data error")
    monkeypatch.setattr(adapters, "build_model", refuse)  # every trained model is built there


def bad_row(tmp_path, row) -> tuple[Path, dict]:
    folder = tmp_path / "data_set"
    train_file = write_split(folder, "train_sft", [GOOD, GOOD, row, GOOD])
    write_split(folder, "test_sft", [GOOD])
    return folder, train_file


CASES = {
    "no messages": ({"prompt": "x", "prompt_id": "p"}, r"field 'messages' is missing"),
    "messages not a list": ({"prompt": "x", "prompt_id": "p", "messages": "hello"}, r"field 'messages' must be a list"),
    "unknown role": (
        {**GOOD, "messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        r"field 'messages\[0\].role' is 'bot'; expected one of system, user, assistant",
    ),
    "empty assistant turn": (
        {**GOOD, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
        r"field 'messages\[1\].content' is an empty assistant turn",
    ),
    "no assistant turn": (
        {**GOOD, "messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]},
        r"field 'messages' has no assistant turn",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_rows_name_file_split_row_and_field(case, tmp_path, make_cfg, no_model):
    row, message = CASES[case]
    folder, train_file = bad_row(tmp_path, row)
    with pytest.raises(DataError, match=rf"^{train_file} split 'train_sft' row 2: {message}") as info:
        train(make_cfg(f"data.path={folder}", "data.max_train_samples=null"))
    assert "\n" not in str(info.value)


def test_missing_data_path(tmp_path, make_cfg, no_model):
    with pytest.raises(DataError, match=r"data.path .*/nowhere does not exist"):
        train(make_cfg(f"data.path={tmp_path / 'nowhere'}"))


def test_missing_split(tmp_path, make_cfg, no_model):
    folder = tmp_path / "data_set"
    write_split(folder, "train_sft", [GOOD])
    with pytest.raises(DataError, match=r"no files for split 'test_sft'.*data.train_split / data.test_split"):
        train(make_cfg(f"data.path={folder}"))


def test_long_conversations_are_truncated_or_dropped_and_counted(tmp_path, make_cfg, hf_cache):
    from hydra.utils import instantiate

    from zephyr_lit.models import load_tokenizer

    long_user = " ".join(["word"] * 300)
    too_long_prompt = {**GOOD, "messages": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "ok"}]}
    long_reply = {**GOOD, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": long_user}]}
    folder = tmp_path / "data_set"
    write_split(folder, "train_sft", [GOOD, too_long_prompt, long_reply, GOOD])
    write_split(folder, "test_sft", [GOOD])
    cfg = make_cfg(f"data.path={folder}", "data.max_length=64", "data.max_train_samples=null")
    datamodule = instantiate(cfg.data)
    datamodule.prepare(load_tokenizer(instantiate(cfg.model)))
    stats = datamodule.stats["train_sft"]
    assert (stats.rows, stats.truncated, stats.dropped) == (4, 2, 1)  # the long reply is cut, kept
    assert len(datamodule.train_set) == 3
    assert max(len(ids) for ids in datamodule.train_set["input_ids"]) == 64


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=0", r"optim.lr=0: must be > 0"),
        ("data.max_length=8", r"data.max_length=8: must be >= 16"),
        ("model.attn_implementation=fast", r"model.attn_implementation=fast: must be one of eager, sdpa"),
        ("optim.scheduler=step", r"optim.scheduler=step: must be one of cosine, linear, constant"),
        ("+trainer.limit_train_batches=0.5", r"trainer.limit_train_batches=0.5: must be 1.0: a cut epoch"),
        ("module.exact_match_batch_size=0", r"module.exact_match_batch_size=0: must be >= 1"),
    ],
)
def test_invalid_config_values_fail_fast(override, message, make_cfg, no_model):
    with pytest.raises(ConfigError, match=message):
        train(make_cfg(override))


def test_all_config_problems_are_reported_at_once(make_cfg, no_model):
    with pytest.raises(ConfigError) as info:
        train(make_cfg("optim.lr=-1", "data.max_length=4"))
    assert "optim.lr=-1" in str(info.value) and "data.max_length=4" in str(info.value)


def test_flash_attention_without_the_package_is_a_clear_error(make_cfg, no_model):
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"needs the flash-attn package.*pip install 'zephyr-lit\[gpu\]'"):
        train(make_cfg("model.attn_implementation=flash_attention_2"))


def test_unknown_config_key_fails_at_composition(make_cfg):
    with pytest.raises(ConfigCompositionException, match="data.no_such_key"):
        make_cfg("data.no_such_key=1")


def test_cli_prints_one_line_error_and_exits_2(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "train.py", f"data.path={tmp_path / 'nowhere'}", f"paths.root={tmp_path}", "logger=csv"],
        cwd=repo, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.path ") and last.endswith("(expected a hub name, a local folder or a file)")
