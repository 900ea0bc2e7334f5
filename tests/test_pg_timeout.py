"""No hang without end: a rank whose peer stops making progress fails within ``strategy.timeout``.

Two DDP ranks over gloo, launched by torchrun like independent cluster tasks, with a 20 s timeout.
Rank 1 stops itself (SIGSTOP: a dead gloo peer fails at once, a stopped one keeps its sockets open,
as a hung GPU or a swapped-out host would) after the forward of step 1; rank 0 waits in the
gradient all-reduce and must end with an error, by itself, within the timeout plus a margin.
``tests/failsafe/hooks.py`` records on each rank its process group's timeout, the error and when it
exited; the stopped rank is SIGKILLed at the end, whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import compose_config
from tests.distributed.process import run_group
from zephyr_lit.config import timeout_problems

REPO = Path(__file__).resolve().parents[1]
HOOKS = "tests.failsafe.hooks"
TIMEOUT_S = 20
MARGIN_S = 15  # the survivor's error handling and interpreter exit on a busy 2-core machine


def test_the_timeout_key_is_a_positive_timedelta_on_both_distributed_strategies():
    for strategy in ("ddp", "deepspeed_zero3"):
        def problems(*overrides: str) -> list[str]:
            return timeout_problems(compose_config([f"strategy={strategy}", *overrides]))

        assert problems() == []
        assert "must be > 0" in problems("strategy.timeout.minutes=0")[0]
        assert "must be a datetime.timedelta config" in problems("strategy.timeout=60")[0]
    assert timeout_problems(compose_config(["strategy=ddp", "strategy.timeout=null"])) == []  # Lightning's default


def is_stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
def test_a_stopped_rank_makes_its_peer_fail_within_the_timeout(tmp_path, hf_cache):
    launcher = Path(sys.executable).with_name("torchrun")
    head = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    out = tmp_path / "facts"
    command = [
        *head, "--standalone", "--nproc-per-node=2", "train.py", "trainer.accelerator=cpu", "trainer.devices=2",
        "strategy=ddp", "~strategy.timeout.minutes", f"+strategy.timeout.seconds={TIMEOUT_S}",
        f"paths.root={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", f"data.cache_dir={hf_cache}",
        "logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "data.exact_match_path=null", "data.max_train_samples=32", "data.max_eval_samples=8", "data.batch_size=4",
        "trainer.max_steps=3", "callbacks.checkpoint=null",
        f"+callbacks.stall._target_={HOOKS}.StallRank", "+callbacks.stall.rank=1", "+callbacks.stall.step=1",
        f"+callbacks.stall.out={out}", f"+callbacks.record._target_={HOOKS}.Record", f"+callbacks.record.out={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    started = time.time()
    try:
        # torchrun then stops the stopped rank: SIGTERM (held while it is stopped), SIGKILL 30 s later
        done = run_group(command, 240, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finally:
        stopped_file = out / "stopped.json"
        if stopped_file.exists() and is_stopped(pid := json.loads(stopped_file.read_text())["pid"]):
            os.kill(pid, signal.SIGKILL)
    log = done.stdout[-4000:]
    assert done.returncode != 0, log
    stopped_at = json.loads(stopped_file.read_text())["at"]
    survivor = json.loads((out / "rank0.json").read_text())
    assert survivor["pg_timeout_s"] == TIMEOUT_S  # the key reached gloo's process group
    assert "timed out" in survivor["error"].lower() or "timeout" in survivor["error"].lower(), survivor["error"]
    waited, exited = survivor["failed_at"] - stopped_at, survivor["exited_at"] - stopped_at
    print(f"\nstopped {stopped_at - started:.1f} s after launch; rank 0 failed {waited:.1f} s and exited "
          f"{exited:.1f} s after it; torchrun ended {time.time() - stopped_at:.1f} s after it")
    assert TIMEOUT_S - 2 < waited < TIMEOUT_S + MARGIN_S, log
    assert exited < TIMEOUT_S + MARGIN_S, log
