"""Both tasks end to end on a random-init embedded model with the rule judge (slow: the model generates),
mt_bench through ``python -m zephyr_lit.evaluate``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.process import run_group

ROOT = Path(__file__).resolve().parents[1]
LEAN = ["max_questions=3", "max_new_tokens=4", "answers.backend.batch_size=4"]


@pytest.fixture(scope="module")
def random_export(tmp_path_factory) -> Path:
    """A random-init tiny-mistral export (with the embedded tokenizer and chat template) in a run folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from zephyr_lit.assets import TINY_MODEL, asset_path

    folder = tmp_path_factory.mktemp("outputs") / "dsft" / "2025-01-01_00-00-00" / "model"
    torch.manual_seed(0)
    AutoTokenizer.from_pretrained(asset_path(TINY_MODEL)).save_pretrained(folder)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(asset_path(TINY_MODEL))).save_pretrained(folder)
    (folder.parents[1] / "latest").symlink_to(folder.parent.name)
    return folder.parents[1] / "latest"


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def evaluate_cli(*overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "zephyr_lit.evaluate", *overrides]
    return run_group(command, cwd=ROOT, capture_output=True, text=True, timeout=300)  # a timeout ends its whole group


@pytest.mark.slow
def test_mt_bench_runs_end_to_end_from_the_command_line(random_export, tmp_path):
    done = evaluate_cli(f"model_path={random_export}", f"output_dir={tmp_path}", *LEAN)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = lines(tmp_path / "model_answer" / "2025-01-01_00-00-00.jsonl")  # the run folder's name, latest resolved
    assert len(answers) == 3 and all(len(a["choices"][0]["turns"]) == 2 for a in answers)
    judgments = lines(tmp_path / "model_judgment" / "rule_single.jsonl")
    assert len(judgments) == 6 and all(1 <= j["score"] <= 10 for j in judgments)
    assert "overall" in done.stdout and (tmp_path / "rule_results.csv").exists()
    assert (tmp_path / "rule_results.png").exists()


@pytest.mark.slow
def test_alpaca_eval_runs_end_to_end_on_the_model(random_export, tmp_path, capsys):
    from tests.conftest import compose_config
    from zephyr_lit.evaluate.app import evaluate

    cfg = compose_config(["task=alpaca_eval", f"model_path={random_export}", f"output_dir={tmp_path}", "model_id=tiny",
                          *LEAN], "evaluate")
    results = evaluate(cfg)
    outputs = json.loads((tmp_path / "tiny" / "model_outputs.json").read_text())
    assert [list(o) for o in outputs] == [["instruction", "output", "generator", "dataset"]] * 3
    assert results["n_total"] + results["n_unrated"] == 3 and 0 <= results["win_rate"] <= 100
    assert "alpaca_eval --model_outputs" in capsys.readouterr().out
