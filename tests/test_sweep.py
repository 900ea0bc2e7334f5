"""Sweeps: ranking by hand, and a real 2 x 2 multirun that writes and prints sweep_summary.csv."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from tests.distributed.process import run_group
from zephyr_lit.sweep import sweep_rows, varying


def write_job(sweep: Path, job: int, overrides: list[str], metrics: dict) -> None:
    (sweep / str(job)).mkdir(parents=True)
    (sweep / str(job) / "summary.json").write_text(json.dumps({"overrides": overrides, "metrics": metrics}))


def test_dpo_jobs_rank_by_accuracy_then_margin(tmp_path):
    write_job(tmp_path, 0, ["dpo.beta=0.01", "seed=1"], {"val/rewards/accuracies": 0.9, "val/rewards/margins": 1.0})
    write_job(tmp_path, 1, ["dpo.beta=0.1", "seed=1"], {"val/rewards/accuracies": 0.95, "val/rewards/margins": 0.5})
    write_job(tmp_path, 2, ["dpo.beta=0.5", "seed=1"], {"val/rewards/accuracies": 0.9, "val/rewards/margins": 2.0})
    rows = sweep_rows(tmp_path)
    assert [r["job"] for r in rows] == ["1", "2", "0"]
    assert [r["overrides"] for r in rows] == ["dpo.beta=0.1", "dpo.beta=0.5", "dpo.beta=0.01"]  # seed is not swept


def test_sft_jobs_rank_by_lowest_loss(tmp_path):
    write_job(tmp_path, 0, ["optim.lr=1e-3"], {"val/loss": 2.0})
    write_job(tmp_path, 1, ["optim.lr=3e-3"], {"val/loss": 1.5})
    assert [r["job"] for r in sweep_rows(tmp_path)] == ["1", "0"]


def test_varying_keeps_swept_keys_only():
    assert varying([["a=1", "b=2"], ["a=1", "b=3"]]) == [["b=2"], ["b=3"]]


def test_two_by_two_multirun_writes_and_prints_the_summary(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    result = run_group(
        [sys.executable, "train.py", "-m", f"paths.root={tmp_path}", "logger=csv", "trainer.max_steps=2",
         "trainer.enable_progress_bar=false", "data.max_train_samples=64", "data.max_eval_samples=16",
         "data.exact_match_path=null", "optim.lr=1e-3,3e-3", "seed=1,2", "hydra.sweep.dir=" + str(tmp_path / "sweep")],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "sweep" / "sweep_summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    losses = [float(r["val/loss"]) for r in rows]
    assert losses == sorted(losses)
    assert {r["overrides"] for r in rows} == {f"optim.lr={lr} seed={s}" for lr in ("0.001", "0.003") for s in (1, 2)}
    assert "Sweep summary" in result.stdout and "val/loss" in result.stdout
    for job in range(4):  # each job's folder is its paths.output_dir
        assert (tmp_path / "sweep" / str(job) / "model" / "model.safetensors").exists()
    assert not (tmp_path / "dsft" / "latest").exists()  # multirun jobs leave the pointer alone


def test_ddpo_two_by_two_sweep_over_beta_and_lr(tmp_path):
    """The issue's command shape: ``-m +experiment=ddpo dpo.beta=0.01,0.1 optim.lr=...`` (few steps each)."""
    repo = Path(__file__).resolve().parents[1]
    sweep = tmp_path / "sweep"
    result = run_group(
        [sys.executable, "train.py", "-m", "+experiment=ddpo", "dpo.beta=0.01,0.1", "optim.lr=5e-4,1e-3",
         "model.name_or_path=${asset:tiny-mistral}", "model.random_init=true", f"paths.root={tmp_path}",
         "logger=csv", "trainer.max_steps=2", "trainer.enable_progress_bar=false", "data.max_train_samples=64",
         "data.max_eval_samples=16", "data.exact_match_path=null", "hydra.sweep.dir=" + str(sweep)],
        cwd=repo, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with open(sweep / "sweep_summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["overrides"] for r in rows} == {f"dpo.beta={b} optim.lr={lr}" for b in ("0.01", "0.1") for lr in ("0.0005", "0.001")}
    ranked = [(float(r["val/rewards/accuracies"]), float(r["val/rewards/margins"])) for r in rows]
    assert ranked == sorted(ranked, reverse=True)  # best first: accuracy, then margin
    assert "Sweep summary" in result.stdout and "val/rewards/accuracies" in result.stdout
    for job in range(4):
        summary = json.loads((sweep / str(job) / "summary.json").read_text())
        assert summary["output_dir"] == str(sweep / str(job)) and summary["global_step"] == 2
