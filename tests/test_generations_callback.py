"""The generations callback: the first held-out prompts of the test split, answered greedily through the one
generation path at every validation, appended to ``generations.jsonl`` by rank 0 and logged as a table."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.utils import instantiate

from tests.conftest import compose_config
from tests.distributed.train_py import train_py
from zephyr_lit.assets import TINY_MODEL, asset_path
from zephyr_lit.evaluation import greedy_replies
from zephyr_lit.generations_log import GenerationsLog, generations_problems, held_out_prompts, prompt_turns
from zephyr_lit.loggers import append_lines
from zephyr_lit.models import ModelSpec, build_model, load_tokenizer

SYSTEM = {"role": "system", "content": "Talk like a pirate."}
USER = {"role": "user", "content": "Capital of Peru?"}
ANSWER = {"role": "assistant", "content": "Lima."}


def test_a_prompt_is_every_turn_before_the_first_assistant_turn():
    follow_up = [{"role": "user", "content": "And Chile?"}, {"role": "assistant", "content": "Santiago."}]
    assert prompt_turns({"messages": [SYSTEM, USER, ANSWER, *follow_up]}) == [SYSTEM, USER]
    assert prompt_turns({"chosen": [USER, ANSWER], "rejected": [USER, {"role": "assistant", "content": "Quito."}]}) \
        == [USER]
    assert prompt_turns({"messages": [SYSTEM, ANSWER]}) is None  # nothing a user asked
    assert prompt_turns({"messages": "not a list"}) is None


def test_the_first_prompts_are_taken_skipping_rows_without_one():
    rows = [{"messages": [ANSWER]}, {"messages": [USER, ANSWER]}, {"messages": [SYSTEM, USER, ANSWER]},
            {"messages": [USER, ANSWER]}]
    assert held_out_prompts(rows, 2) == [[USER], [SYSTEM, USER]]
    assert held_out_prompts(rows, 10) == [[USER], [SYSTEM, USER], [USER]]


def test_append_lines_cuts_a_torn_last_line_before_appending(tmp_path):
    path = tmp_path / "generations.jsonl"
    append_lines(path, '{"step": 0}\n')
    with open(path, "a") as handle:
        handle.write('{"step": 1, "rep')  # a kill inside the second write
    append_lines(path, '{"step": 1}\n')
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n'


def test_bad_settings_are_config_problems():
    assert generations_problems(None) == []
    problems = generations_problems({"num_prompts": 0, "max_new_tokens": 8, "batch_size": -1})
    assert [p.split("=")[0] for p in problems] == ["callbacks.generations.num_prompts",
                                                   "callbacks.generations.batch_size"]


class TableLogger:
    """What the callback needs of ``WandbLogger``: ``log_table``."""

    def __init__(self) -> None:
        self.tables: list[dict] = []

    def log_table(self, key, columns, data, step):
        self.tables.append({"key": key, "columns": columns, "data": data, "step": step})


@pytest.fixture(scope="module")
def tiny():
    spec = ModelSpec(name_or_path=asset_path(TINY_MODEL), random_init=True, init_seed=3)
    return build_model(spec).eval(), load_tokenizer(spec)


def embedded_callback(tmp_path: Path, hf_cache: Path, num_prompts: int = 3) -> GenerationsLog:
    """The callback as configured, its prompts read from the embedded dSFT data's test split."""
    cfg = compose_config([f"paths.output_dir={tmp_path}", f"data.cache_dir={hf_cache}",
                          f"callbacks.generations.num_prompts={num_prompts}",
                          "callbacks.generations.max_new_tokens=6", "callbacks.generations.batch_size=2"])
    callback = instantiate(cfg.callbacks.generations)
    callback.setup(SimpleNamespace(datamodule=instantiate(cfg.data)), None, "fit")
    return callback


def fake_trainer(step: int, rank: int, loggers=()):
    return SimpleNamespace(sanity_checking=False, is_global_zero=rank == 0, global_step=step, loggers=list(loggers))


def test_each_validation_appends_the_replies_of_the_model_and_logs_the_table(tmp_path, hf_cache, tiny):
    model, tokenizer = tiny
    callback, table = embedded_callback(tmp_path, hf_cache), TableLogger()
    expected_prompts = held_out_prompts(
        [json.loads(line) for line in open(asset_path("data/ultrachat_tiny/data/test_sft-00000-of-00001.jsonl"))], 3)
    assert callback.prompts == expected_prompts and len(expected_prompts) == 3
    module = SimpleNamespace(trained_model=model, tokenizer=tokenizer)
    for step in (0, 5):
        callback.on_validation_epoch_end(fake_trainer(step, 0, [table, object()]), module)
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    replies = greedy_replies(model, tokenizer, expected_prompts, max_new_tokens=6)
    assert [r["step"] for r in rows] == [0, 0, 0, 5, 5, 5]
    assert [r["reply"] for r in rows] == replies * 2 and any(replies)
    assert [r["prompt"] for r in rows[:3]] == [p[-1]["content"] for p in expected_prompts]
    assert [r["messages"] for r in rows[:3]] == expected_prompts
    assert [(t["key"], t["step"], len(t["data"])) for t in table.tables] == [("val/generations", 0, 3),
                                                                           ("val/generations", 5, 6)]
    assert table.tables[-1]["columns"] == ["step", "prompt", "reply"]
    assert table.tables[-1]["data"][4] == [5, rows[4]["prompt"], rows[4]["reply"]]


def test_every_rank_makes_the_same_generate_calls_and_only_rank_0_writes(tmp_path, hf_cache, tiny, monkeypatch):
    model, tokenizer = tiny
    calls: list[int] = []
    real_generate = model.generate

    def counted(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counted)
    module = SimpleNamespace(trained_model=model, tokenizer=tokenizer)
    callback, per_rank = embedded_callback(tmp_path, hf_cache), {}
    for rank in (1, 0):
        calls.clear()
        callback.on_validation_epoch_end(fake_trainer(2, rank), module)
        per_rank[rank] = list(calls)
        assert (tmp_path / "generations.jsonl").exists() == (rank == 0)
    assert per_rank[0] == per_rank[1] == [2, 1]  # 3 prompts, 2 per generate call


# ---- slow: real runs ---------------------------------------------------------------------------
TINY_RUN = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "data.max_train_samples=32",
            "data.max_eval_samples=8", "data.batch_size=8", "trainer.max_steps=2", "data.exact_match_path=null",
            "callbacks.generations.max_new_tokens=8"]


def export_replies(run: Path) -> list[str]:
    """Greedy replies of the run's export to the prompts it logged, through ``greedy_replies`` directly."""
    spec = ModelSpec(name_or_path=str(run / "model"))
    rows = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    prompts = [r["messages"] for r in rows[:4]]
    return greedy_replies(build_model(spec).eval(), load_tokenizer(spec), prompts, max_new_tokens=8)


def logged(run: Path) -> list[tuple[int, str]]:
    return [(r["step"], r["reply"]) for r in map(json.loads, (run / "generations.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_a_tiny_run_logs_the_exported_models_replies_to_jsonl_and_a_wandb_table(tmp_path, hf_cache, monkeypatch):
    from zephyr_lit.run import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    train(compose_config([f"paths.root={tmp_path}", f"paths.output_dir={run}", f"data.cache_dir={hf_cache}",
                          *TINY_RUN]), update_latest=False)
    rows = logged(run)
    assert [step for step, _ in rows] == [0] * 4 + [2] * 4  # before the first step and on the final weights
    assert [reply for _, reply in rows[4:]] == export_replies(run)
    tables = sorted(run.glob("wandb/offline-run-*/files/media/table/val/generations_*.table.json"))
    assert len(tables) == 2, list(run.glob("wandb/**/*"))
    last = max((json.loads(t.read_text()) for t in tables), key=lambda t: len(t["data"]))
    assert last["columns"] == ["step", "prompt", "reply"]
    assert [(step, reply) for step, _, reply in last["data"]] == rows


@pytest.mark.slow
def test_two_ranks_write_each_validation_once_with_the_exported_models_replies(tmp_path, hf_cache):
    run = tmp_path / "run"
    overrides = [f"paths.root={tmp_path}", f"paths.output_dir={run}", f"data.cache_dir={hf_cache}", "logger=csv",
                 *TINY_RUN, "data.batch_size=4"]  # 4 pairs per rank: the same global batch as one rank with 8
    assert train_py(overrides, tmp_path / "two.log", ranks=2) == 0, (tmp_path / "two.log").read_text()[-4000:]
    rows = logged(run)
    assert [step for step, _ in rows] == [0] * 4 + [2] * 4  # rank 0 alone wrote
    assert [reply for _, reply in rows[4:]] == export_replies(run)


def test_bad_callback_settings_fail_with_the_rest_of_the_config_before_the_tokenizer(tmp_path, hf_cache):
    from zephyr_lit.errors import ConfigError
    from zephyr_lit.run import train

    cfg = compose_config([f"paths.root={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", f"data.cache_dir={hf_cache}",
                          "callbacks.generations.num_prompts=0", "optim.lr=0", "model.tokenizer_name_or_path=/nowhere"])
    with pytest.raises(ConfigError) as error:
        train(cfg)
    assert "callbacks.generations.num_prompts=0" in str(error.value) and "optim.lr=0" in str(error.value)
