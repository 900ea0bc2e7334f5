"""``train/*`` are the window's, logged once per optimizer step: micro-batch 4 x accumulation 2 and
8 x 1 log the same values at every step, for SFT and DPO, with and without (CPU) ZeRO-3.

The two runs see the same 8 rows per step and take the same AdamW steps (the gradient of a window is
the same however it is split), so every ``train/`` metric must agree at every step; only
``train/tokens_per_s`` (wall time) is left out. Under DeepSpeed, Lightning calls
``on_before_optimizer_step`` after every micro-batch: logging there gave one micro-batch's share of
the loss (3.263 at 4 x 2 against 6.955 at 8 x 1 on the embedded dSFT).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.conftest import compose_config
from tests.zero3.launch import run_zero3
from zephyr_lit.assets import TINY_MODEL, asset_path
from zephyr_lit.run import train

pytestmark = pytest.mark.slow
STEPS = 4
COMMON = ["logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
          "trainer.log_every_n_steps=1", "data.exact_match_path=null", f"data.max_train_samples={8 * STEPS}",
          "data.max_eval_samples=8", "data.max_length=64", "trainer.max_epochs=1", "optim.scheduler=linear",
          "optim.warmup_ratio=0.25", "callbacks.validate_at_edges=null", "callbacks.checkpoint=null"]
SFT = ["optim.lr=3e-3"]
DPO = ["+experiment=ddpo", f"model.name_or_path={asset_path(TINY_MODEL)}", "model.random_init=true",
       "data.max_prompt_length=32", "optim.lr=1e-3"]
SPLITS = {"4x2": ["data.batch_size=4", "trainer.accumulate_grad_batches=2"],
          "8x1": ["data.batch_size=8", "trainer.accumulate_grad_batches=1"]}


def train_metrics(path: Path) -> dict[int, dict[str, float]]:
    """``{step: {train/ metric: value}}`` from a run's CSV; each metric may appear once per step."""
    out: dict[int, dict[str, float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key.startswith("train/") and key != "train/tokens_per_s" and value not in ("", None):
                    step = out.setdefault(int(row["step"]), {})
                    assert key not in step, f"{key} logged twice at step {row['step']}"
                    step[key] = float(value)
    return out


def compare(runs: dict[str, dict[int, dict[str, float]]], expected: set[str]) -> None:
    split, whole = runs["4x2"], runs["8x1"]
    assert sorted(whole) == sorted(split) == list(range(STEPS))  # once per optimizer step
    for step, metrics in whole.items():
        assert set(metrics) == set(split[step]) and expected <= set(metrics), step
        assert split[step] == pytest.approx(metrics, rel=1e-3, abs=1e-6), step


def run_plain(tmp_path, hf_cache, task: list[str]) -> dict[str, dict]:
    runs = {}
    for name, split in SPLITS.items():
        out = tmp_path / name
        train(compose_config([f"paths.root={tmp_path}", f"paths.output_dir={out}", f"data.cache_dir={hf_cache}",
                              *COMMON, *task, *split]), update_latest=False)
        runs[name] = train_metrics(out / "metrics.csv")
    return runs


def run_deepspeed(tmp_path, task: list[str]) -> dict[str, dict]:
    runs = {}
    for name, split in SPLITS.items():
        out = tmp_path / name
        run_zero3(tmp_path, name, *COMMON, *task, *split, f"paths.output_dir={out}", devices=1)
        runs[name] = train_metrics(out / "metrics.csv")
    return runs


SFT_METRICS = {"train/loss", "train/lr"}
DPO_METRICS = {"train/loss", "train/lr", "train/nll_loss", "train/rewards/chosen", "train/rewards/rejected",
               "train/rewards/margins", "train/rewards/accuracies", "train/logps/chosen", "train/logps/rejected",
               "train/logits/chosen", "train/logits/rejected"}


def test_sft_window_metrics_do_not_depend_on_the_split(tmp_path, hf_cache):
    compare(run_plain(tmp_path, hf_cache, SFT), SFT_METRICS)


def test_dpo_window_metrics_do_not_depend_on_the_split(tmp_path, hf_cache):
    compare(run_plain(tmp_path, hf_cache, DPO), DPO_METRICS)


def test_sft_window_metrics_under_zero3(tmp_path):
    compare(run_deepspeed(tmp_path, SFT), SFT_METRICS)


def test_dpo_window_metrics_under_zero3(tmp_path):
    compare(run_deepspeed(tmp_path, DPO), DPO_METRICS)
