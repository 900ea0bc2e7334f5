"""A non-finite loss or gradient: ``module.nonfinite=stop`` ends every rank before the step is applied
or checkpointed, with one line and no export; ``skip`` leaves weights and optimizer state untouched
for that step, on every rank, and counts it.

Divergence is real here (dSFT at ``optim.lr=1e4``: the gradient norm overflows at step 2) or injected
(``tests/nonfinite/inject.py``: one NaN in one rank's gradient at one step, after DDP averaged them,
so only that rank sees it: a rank deciding alone would hang or part from the others)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import compose_config
from tests.distributed.process import run_group
from tests.distributed.train_py import REPO, train_py
from zephyr_lit.config import config_problems
from zephyr_lit.nonfinite import DivergenceError
from zephyr_lit.run import train

INJECT = "tests.nonfinite.inject.InjectNaN"
SMALL = ["data.max_train_samples=64", "data.max_eval_samples=8", "data.exact_match_path=null", "data.batch_size=8",
         "trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=1"]


def inject(step: int, rank: int, record: Path) -> list[str]:
    return [f"+callbacks.nan._target_={INJECT}", f"+callbacks.nan.step={step}", f"+callbacks.nan.rank={rank}",
            f"+callbacks.nan.record={record}"]


def test_the_policy_keys_are_checked_with_the_rest_of_the_config():
    cfg = compose_config(["module.nonfinite=ignore", "module.max_skipped_steps=-1"])
    problems = config_problems(cfg)
    assert any(p.startswith("module.nonfinite=ignore: must be one of stop, skip") for p in problems)
    assert any(p.startswith("module.max_skipped_steps=-1") for p in problems)
    zero3 = compose_config(["+experiment=zephyr-7b-beta-dsft", "module.nonfinite=skip"])
    assert any("module.nonfinite=skip: DeepSpeed" in p for p in config_problems(zero3))


def test_divergence_stops_before_the_step_with_no_export_and_the_last_checkpoint_kept(make_cfg, tmp_path):
    cfg = make_cfg(*SMALL, "optim.lr=1e4")
    run = Path(cfg.paths.output_dir)
    with pytest.raises(DivergenceError) as error:
        train(cfg)
    message = str(error.value)
    assert "\n" not in message and message.startswith("optimizer step 2: the gradient norm is not finite")
    assert str(run / "checkpoints" / "last.ckpt") in message
    assert not (run / "model").exists() and not (run / "summary.json").exists()
    assert not (tmp_path / "outputs" / "dsft" / "latest").exists()
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 1  # step 1 was good and saved; step 2 was neither applied nor saved
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def test_skip_leaves_weights_and_adam_state_untouched_and_counts_the_step(make_cfg, tmp_path):
    record = tmp_path / "facts"
    cfg = make_cfg(*SMALL, "module.nonfinite=skip", *inject(3, 0, record))
    summary = train(cfg)
    facts = json.loads((record / "rank0.json").read_text())
    assert facts["changed"] == [True, True, False, True, True, True]  # step 3 moved no weight
    assert facts["adam_steps"] == [[1], [2], [2], [3], [4], [5]]  # nor AdamW's state
    assert summary["global_step"] == 6 and summary["nonfinite_skipped_steps"] == 1


def test_skip_stops_past_max_skipped_steps(make_cfg, tmp_path):
    cfg = make_cfg(*SMALL, "module.nonfinite=skip", "module.max_skipped_steps=0", *inject(3, 0, tmp_path / "f"))
    with pytest.raises(DivergenceError, match=r"^optimizer step 3: the gradient norm .*after 0 skipped steps"):
        train(cfg)


# ---- several ranks ----------------------------------------------------------------------------------
def ddp_run(tmp_path: Path, hf_cache: Path, name: str, *extra: str) -> tuple[int, Path, str]:
    out = tmp_path / name
    log = tmp_path / f"{name}.log"
    overrides = [f"paths.root={tmp_path / 'outputs'}", f"paths.output_dir={out}", f"data.cache_dir={hf_cache}",
                 "logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                 *SMALL, "data.batch_size=4", *extra]
    code = train_py(overrides, log, ranks=2, timeout=300)
    return code, out, log.read_text()


@pytest.mark.slow
def test_a_nan_on_one_ddp_rank_stops_both_ranks_together(tmp_path, hf_cache):
    code, out, log = ddp_run(tmp_path, hf_cache, "stop", *inject(3, 1, tmp_path / "facts"))
    assert code != 0
    assert log.count("optimizer step 3: the gradient norm is not finite") == 2, log[-3000:]  # each rank's line
    assert not (out / "model").exists()
    assert torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2


@pytest.mark.slow
def test_a_nan_on_one_ddp_rank_is_skipped_by_both_ranks(tmp_path, hf_cache):
    code, out, log = ddp_run(tmp_path, hf_cache, "skip", "module.nonfinite=skip", *inject(3, 1, tmp_path / "facts"))
    assert code == 0, log[-3000:]
    for rank in (0, 1):
        facts = json.loads((tmp_path / "facts" / f"rank{rank}.json").read_text())
        assert facts["changed"] == [True, True, False, True, True, True]
        assert facts["skipped"][-1] == 1
    assert json.loads((out / "summary.json").read_text())["nonfinite_skipped_steps"] == 1
    assert all(torch.isfinite(w).all() for w in load_file(out / "model" / "model.safetensors").values())


@pytest.mark.slow
def test_a_nan_in_one_zero3_ranks_gradient_partition_stops_both_ranks(tmp_path):
    """Real ZeRO-3 on 2 CPU ranks: its bf16 path has no overflow check; ours asks its optimizer."""
    out = tmp_path / "run"
    cmd = [sys.executable, "tests/zero3/run_zero3.py", str(tmp_path / "probe"), f"paths.root={tmp_path}",
           f"paths.output_dir={out}", "trainer.devices=2", "logger=csv", "trainer.enable_progress_bar=false",
           "trainer.enable_model_summary=false", *SMALL, "data.batch_size=4", *inject(3, 1, tmp_path / "facts")]
    result = run_group(cmd, 400, cwd=REPO, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "optimizer step 3: the gradient norm is not finite" in output, output[-3000:]
    assert not (out / "model").exists()
    assert (out / "checkpoints" / "last.ckpt").is_dir()  # the sharded checkpoint of step 2
