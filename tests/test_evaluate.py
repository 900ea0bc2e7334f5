"""``python -m zephyr_lit.evaluate``: config checks, the model id, the question files, and both tasks' files
(FastChat's answer and judgment schemas, AlpacaEval's outputs), with scripted answers and fake judges (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import open_dict

from tests.conftest import compose_config
from zephyr_lit.assets import ASSETS_DIR, asset_path
from zephyr_lit.assets.eval_sets import ALPACA_EVAL, EVAL_DIR, MT_BENCH
from zephyr_lit.distill.scripted import ScriptedBackend
from zephyr_lit.errors import ConfigError, DataError
from zephyr_lit.evaluate.alpaca_eval import compare
from zephyr_lit.evaluate.answers import Conversation, answer_conversations
from zephyr_lit.evaluate.app import evaluate, resolve_model
from zephyr_lit.evaluate.inputs import read_questions
from zephyr_lit.evaluate.judging import JudgeSettings
from zephyr_lit.generation import Reply, Sampling

ANSWER_FIELDS = {"question_id", "answer_id", "model_id", "choices", "tstamp"}
JUDGMENT_FIELDS = {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}


class Recorder(ScriptedBackend):
    """The scripted persona, keeping every request it is sent."""

    def __init__(self, persona: str = "courteous") -> None:
        super().__init__(persona)
        self.requests = []

    def generate(self, requests):
        self.requests += list(requests)
        return super().generate(requests)


class FakeJudge:
    """Replies from a list, in order (then the last one again); counts its calls."""

    def __init__(self, *replies: str, name: str = "fake") -> None:
        self.replies, self.name, self.calls = list(replies), name, 0

    def generate(self, requests):
        out = []
        for _ in requests:
            out.append(Reply(self.replies[min(self.calls, len(self.replies) - 1)]))
            self.calls += 1
        return out


def export(folder: Path) -> Path:
    """A stand-in export folder (only its config.json is looked at before a model loads)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    return folder


def scripted_cfg(tmp_path: Path, *overrides: str, persona: str = "courteous"):
    """The evaluate config with a scripted persona as the model under test (no model to load)."""
    cfg = compose_config([f"model_path={export(tmp_path / 'run' / 'model')}", f"output_dir={tmp_path / 'out'}",
                          *overrides], "evaluate")
    with open_dict(cfg):
        cfg.answers.backend = {"_target_": "zephyr_lit.distill.scripted.ScriptedBackend", "persona": persona}
    return cfg


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_config_problem_comes_in_one_message_before_any_model_loads(tmp_path):
    cfg = compose_config([f"model_path={tmp_path / 'nowhere' / 'model'}", "model_id=a/b", "max_new_tokens=0",
                          f"questions={tmp_path / 'missing.jsonl'}", "judge.retries=-1",
                          f"judge_prompts={tmp_path / 'prompts.jsonl'}"], "evaluate")
    with pytest.raises(ConfigError) as error:
        evaluate(cfg)
    message = str(error.value)
    for part in ("model_path=", "no such folder", "model_id='a/b'", "max_new_tokens=0", "missing.jsonl: no such file",
                 "prompts.jsonl: no such file", "judge.retries=-1"):
        assert part in message
    assert "\n" not in message
    cfg.task = "nope"
    with pytest.raises(ConfigError, match="task='nope' is unknown; use one of mt_bench, alpaca_eval, prefs"):
        evaluate(cfg)


def test_the_rule_judge_with_other_judge_prompts_is_refused(tmp_path):
    other = tmp_path / "judge_prompts.jsonl"
    other.write_text(Path(asset_path(f"{EVAL_DIR}/judge_prompts.jsonl")).read_text())
    with pytest.raises(ConfigError, match="judge=rule grades with the project's judge prompts only"):
        evaluate(scripted_cfg(tmp_path, f"judge_prompts={other}"))


def test_the_model_id_is_the_run_folders_name_with_latest_resolved(tmp_path):
    run = export(tmp_path / "outputs" / "dsft" / "2025-01-02_03-04-05" / "model").parent
    (tmp_path / "outputs" / "dsft" / "latest").symlink_to(run.name)
    for given in ("outputs/dsft/latest/model", "outputs/dsft/latest"):
        ref = resolve_model(str(tmp_path / given))
        assert (ref.path, ref.model_id, ref.local) == (str(run / "model"), "2025-01-02_03-04-05", True)
    assert resolve_model("HuggingFaceH4/zephyr-7b-beta").model_id == "zephyr-7b-beta"


def test_a_question_file_breaking_fastchats_schema_is_refused_naming_line_and_field(tmp_path):
    path = tmp_path / "question.jsonl"
    good = {"question_id": 2, "category": "math", "turns": ["a", "b"], "reference": ["c", "d"]}
    for bad, field in [({**good, "turns": ["a", "b", "c"]}, "turns"), ({**good, "reference": ["c"]}, "reference"),
                       ({**good, "question_id": 1}, "question_id"), ({**good, "category": None}, "category")]:
        path.write_text(json.dumps({**good, "question_id": 1}) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=rf"question.jsonl line 2, field '{field}'"):
            read_questions(path)


def test_a_reference_category_question_without_a_reference_is_refused_before_answers(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text(json.dumps({"question_id": 5, "category": "math", "turns": ["Calculate 7 + 12."]}) + "\n")
    with pytest.raises(DataError, match="question_id 5 .category math. has no reference answer"):
        evaluate(scripted_cfg(tmp_path, f"questions={path}"))
    assert not (tmp_path / "out" / "model_answer").exists()


def test_the_shipped_eval_files_are_what_the_generator_writes(tmp_path):
    from zephyr_lit.assets.eval_sets import write_eval_sets
    from zephyr_lit.assets.generate import SEED, build_splits

    write_eval_sets(tmp_path, build_splits()["test_sft"], SEED)
    written = sorted(p.relative_to(tmp_path) for p in (tmp_path / EVAL_DIR).rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(ASSETS_DIR) for p in (ASSETS_DIR / EVAL_DIR).rglob("*") if p.is_file())
    assert written == shipped and len(written) == 3
    assert all((tmp_path / p).read_bytes() == (ASSETS_DIR / p).read_bytes() for p in written)
    questions = read_questions(asset_path(MT_BENCH))
    assert len(questions) == 20 and all(len(q.turns) == 2 for q in questions)
    assert {q.category for q in questions if q.reference} == {"math", "reasoning"}


def test_the_second_turn_is_asked_with_the_first_question_and_answer():
    backend = Recorder()
    items = [Conversation("1", ("Calculate 7 + 12.", "What about 1 + 1?"), Sampling(0.0, 1.0, 16))]
    answers = answer_conversations(backend, items, seed=42)
    assert answers == [("7 + 12 = 19.", "1 + 1 = 2.")]
    assert [len(r.messages) for r in backend.requests] == [1, 3]
    assert list(backend.requests[1].messages) == [
        {"role": "user", "content": "Calculate 7 + 12."}, {"role": "assistant", "content": "7 + 12 = 19."},
        {"role": "user", "content": "What about 1 + 1?"}]


def test_mt_bench_writes_fastchats_answer_and_judgment_files_and_the_table(tmp_path):
    results = evaluate(scripted_cfg(tmp_path, "max_questions=12", "mt_bench.chunk_size=5"))  # 3 chunks
    out = tmp_path / "out"
    answers = lines(out / "model_answer" / "run.jsonl")
    assert [a["question_id"] for a in answers] == list(range(1, 13))
    assert all(set(a) == ANSWER_FIELDS and a["model_id"] == "run" and isinstance(a["tstamp"], float) for a in answers)
    assert all(a["choices"][0]["index"] == 0 and len(a["choices"][0]["turns"]) == 2 for a in answers)
    assert len({a["answer_id"] for a in answers}) == 12
    judgments = lines(out / "model_judgment" / "rule_single.jsonl")
    assert len(judgments) == 24 and all(set(j) == JUDGMENT_FIELDS for j in judgments)
    by_key = {(j["question_id"], j["turn"]): j for j in judgments}
    math_turn2, humanities_turn2 = by_key[(1, 2)], by_key[(11, 2)]
    assert math_turn2["judge"] == ["rule", "single-math-v1-multi-turn"] and "1 + 1 = 2." in math_turn2["user_prompt"]
    assert "7 + 12 = 19." in math_turn2["user_prompt"]  # the first answer (and the reference) are in the turn-2 prompt
    assert humanities_turn2["judge"] == ["rule", "single-v1-multi-turn"]
    assert "Reference" not in humanities_turn2["user_prompt"] and "Reference" in by_key[(1, 1)]["user_prompt"]
    assert {j["score"] for j in judgments} == {10}  # the courteous persona gives every reference reply
    assert results == {"math": 10.0, "reasoning": 10.0, "humanities": 10.0, "turn 1": 10.0, "turn 2": 10.0,
                       "overall": 10.0}
    assert (out / "rule_results.csv").read_text().splitlines()[-1] == "overall,10.0000"
    assert (out / "rule_results.png").read_bytes()[:4] == b"\x89PNG"


def test_two_model_ids_in_one_folder_are_compared_side_by_side(tmp_path, monkeypatch):
    """Questions 1-4 are sums: the courteous persona's replies grade 10, wrong_fact's wrong sums 2."""
    monkeypatch.setattr("zephyr_lit.evaluate.mt_bench.plot_categories", lambda *args: True)  # the chart: tested above
    evaluate(scripted_cfg(tmp_path, "max_questions=4"))
    evaluate(scripted_cfg(tmp_path, "max_questions=4", "model_id=wrong", persona="wrong_fact"))
    assert sorted(p.name for p in (tmp_path / "out" / "model_answer").iterdir()) == ["run.jsonl", "wrong.jsonl"]
    assert (tmp_path / "out" / "rule_results.csv").read_text() == (
        "score,run,wrong\nmath,10.0000,2.0000\nturn 1,10.0000,2.0000\nturn 2,10.0000,2.0000\noverall,10.0000,2.0000\n")


def test_mt_bench_retries_unreadable_grades_counts_them_and_a_rerun_keeps_what_is_done(tmp_path, monkeypatch):
    import zephyr_lit.evaluate.mt_bench as mt_bench

    judge = FakeJudge("I like it.", "no grade", "Rating: [[3]]", "no grade", "no grade")
    monkeypatch.setattr(mt_bench, "plot_categories", lambda *args: True)
    monkeypatch.setattr(mt_bench, "instantiate", lambda node: judge if "Rule" in node._target_ else
                        ScriptedBackend("courteous"))
    evaluate(scripted_cfg(tmp_path, "max_questions=1", "judge.retries=2"))
    judgments = lines(tmp_path / "out" / "model_judgment" / "fake_single.jsonl")
    # turn 1 reads [[3]] at its first retry; turn 2 is asked 1 + 2 times, then counted unrated (-1)
    assert sorted((j["turn"], j["score"]) for j in judgments) == [(1, 3), (2, -1)]
    assert judge.calls == 2 + 2 + 1
    evaluate(scripted_cfg(tmp_path, "max_questions=1", "judge.retries=2"))
    assert judge.calls == 5  # every judgment kept: nothing asked again


def test_alpaca_eval_writes_model_outputs_as_alpaca_eval_reads_them_and_a_leaderboard(tmp_path):
    results = evaluate(scripted_cfg(tmp_path, "task=alpaca_eval", "max_questions=8"))
    outputs = json.loads((tmp_path / "out" / "run" / "model_outputs.json").read_text())
    assert isinstance(outputs, list) and len(outputs) == 8
    assert all(list(o) == ["instruction", "output", "generator", "dataset"] for o in outputs)
    assert {o["generator"] for o in outputs} == {"run"}
    reference = json.loads(Path(asset_path(ALPACA_EVAL)).read_text())
    assert [o["instruction"] for o in outputs] == [r["instruction"] for r in reference[:8]]
    # the courteous persona's full reply beats the terse reference's bare fact in both orders
    assert (results["win_rate"], results["n_wins"], results["n_total"]) == (100.0, 8, 8)
    header, row = (tmp_path / "out" / "rule_leaderboard.csv").read_text().splitlines()
    assert header.startswith("model,win_rate,standard_error,n_wins,n_wins_base,n_draws,n_total")
    assert row.startswith("run,100.0000,0.0000,8,0,0,8")


def test_both_orders_cancel_a_judge_that_always_picks_the_first_reply(tmp_path):
    outputs = [{"instruction": f"q{i}", "output": f"model {i}", "generator": "m", "dataset": ""} for i in range(3)]
    references = {f"q{i}": {"instruction": f"q{i}", "output": f"ref {i}", "generator": "r"} for i in range(3)}
    judge, prompts = FakeJudge("The first is better. [[A]]"), asset_path(f"{EVAL_DIR}/judge_prompts.jsonl")
    annotations, _ = compare(outputs, references, judge, prompts, tmp_path / "annotations.json", JudgeSettings(),
                             seed=1, chunk_size=2)
    assert judge.calls == 6 and [a["preference"] for a in annotations] == [1.5, 1.5, 1.5]
    assert annotations[0]["output_1"] == "ref 0" and annotations[0]["output_2"] == "model 0"
    outputs[2]["output"] = "model 2, answered again"
    again, counts = compare(outputs, references, judge, prompts, tmp_path / "annotations.json", JudgeSettings(), seed=1)
    assert judge.calls == 8 and counts["kept"] == 2 and again[2]["output_2"] == "model 2, answered again"
