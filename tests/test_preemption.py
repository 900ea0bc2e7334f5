"""Preemption on SLURM: a signal raises a flag, the run saves ``last.ckpt`` at the next window end on every
rank, requeues (SIGUSR1) or not (SIGTERM), exits 75 or 143, and the requeued job resumes by itself.

The slow tests run ``train.py`` as SLURM would: a stand-in ``srun`` (``tests/preemption/srun.py``) starts
the tasks with SLURM's variables (so Lightning takes its ``SLURMEnvironment``, auto-requeue and all), a
stand-in ``scontrol`` records its arguments, and ``tests/preemption/signal_at.py`` sends the signal at
the first micro-batch of a window (accumulation 2: mid-window), so the save must wait one micro-batch.
Single process: 32 rows, 2 per micro-batch, 16 micro-batches = 8 steps in the epoch; signalled after
step 3, saved at step 4 after 8 micro-batches. ZeRO-3 on 2 CPU ranks: 16 rows per rank, 8 micro-batches
= 4 steps an epoch; rank 1 alone signalled after step 1, both save at step 2 after 4 micro-batches.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from tests.distributed.process import run_group
from tests.distributed.train_py import max_abs_diff, weights
from tests.test_launch import clean_env
from zephyr_lit.config import config_problems
from zephyr_lit.preemption import NONE, REQUEUE, STOP, Preempted, Preemption, slurm_job_id, slurm_restarts
from zephyr_lit.run import resolve_ckpt_path

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-6
SIGNAL_AT = "tests.preemption.signal_at.SignalAt"
TINY = ["logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "data.exact_match_path=null", "data.max_train_samples=32", "data.max_eval_samples=8", "data.batch_size=2",
        "trainer.accumulate_grad_batches=2", "trainer.max_steps=8", "optim.lr=1e-3", "optim.scheduler=constant",
        "optim.warmup_ratio=0"]
ZERO3 = ["strategy=deepspeed_zero3", "strategy._target_=tests.zero3.cpu_strategy.CPUDeepSpeedStrategy",
         "trainer.accelerator=cpu", "trainer.devices=2",
         "strategy.config.zero_optimization.stage3_param_persistence_threshold=0"]


# --- a fake SLURM job ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """One SLURM job id on this machine: ``run`` launches ``train.py`` on ``ntasks`` stand-in srun tasks;
    ``scontrol_calls`` are the argument lines the stand-in ``scontrol`` received."""

    def __init__(self, tmp_path: Path, hf_cache: Path, job_id: str = "4242") -> None:
        self.tmp, self.id, self.hf_cache = tmp_path, job_id, hf_cache
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        scontrol = self.bin / "scontrol"
        scontrol.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path / "scontrol.calls"}"\n')
        scontrol.chmod(0o755)

    @property
    def scontrol_calls(self) -> list[str]:
        calls = self.tmp / "scontrol.calls"
        return calls.read_text().splitlines() if calls.exists() else []

    def run(self, name: str, out: Path, *overrides: str, ntasks: int = 1, restarts: int = 0,
            timeout: float = 300) -> tuple[list[int], str]:
        """Every task's exit code and rank 0's output; ``restarts`` sets ``SLURM_RESTART_COUNT`` (a requeued job)."""
        env = clean_env(SLURM_JOB_ID=self.id, ZEPHYR_RUN_ID=self.id, OMP_NUM_THREADS="1", WANDB_MODE="disabled",
                        DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                        PATH=f"{self.bin}:{Path(sys.executable).parent}:{os.environ['PATH']}")
        if restarts:
            env["SLURM_RESTART_COUNT"] = str(restarts)
        logs = self.tmp / f"{name}-logs"
        cmd = [sys.executable, "tests/preemption/srun.py", str(ntasks), str(logs), sys.executable, "train.py",
               f"paths.root={self.tmp / 'outputs'}", f"paths.output_dir={out}", f"data.cache_dir={self.hf_cache}",
               *TINY, *overrides]
        run_group(cmd, timeout, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        codes = [int(code) for code in (logs / "exit_codes").read_text().split()]
        return codes, (logs / "task0.log").read_text()


def signal_at(step: int, *extra: str) -> list[str]:
    return [f"+callbacks.signal._target_={SIGNAL_AT}", f"+callbacks.signal.step={step}",
            *(f"+callbacks.signal.{item}" for item in extra)]


def assert_stopped_cleanly(run: Path, root: Path) -> None:
    """No export, no summary, no `latest`, and no checkpoint of Lightning's own SLURM handler."""
    assert not (run / "model").exists() and not (run / "summary.json").exists()
    assert not (root / "dsft" / "latest").exists()
    assert not list(run.rglob("hpc_ckpt_*"))


def assert_saved_at_window_end(state: dict, step: int, world_size: int = 1) -> None:
    """Saved in the window-closing micro-batch 2 x ``step`` (accumulation 2), not in the signalled one."""
    assert state["global_step"] == step
    assert state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["ready"] == 2 * step
    assert state["zephyr_resume"]["data"]["micro_batches"] == 2 * step
    assert len(state["zephyr_resume"]["rng"]) == world_size


# --- slow: real runs ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigusr1_saves_at_the_window_end_requeues_and_the_requeued_job_ends_where_an_uninterrupted_one_does(
        tmp_path, hf_cache):
    job = Job(tmp_path, hf_cache)
    run, root = tmp_path / "outputs" / "dsft" / job.id, tmp_path / "outputs"
    # to the whole process group, as SLURM signals every process of the step: the DataLoader worker too
    command = ["data.num_workers=1", *signal_at(3, "group=true")]
    codes, log = job.run("preempted", run, *command)
    assert codes == [75], log[-3000:]
    assert job.scontrol_calls == [f"requeue {job.id}"]
    last = run / "checkpoints" / "last.ckpt"
    assert f"Preempted (SIGUSR1 at step 4): checkpoint saved to {last}; requeued SLURM job {job.id}" in log
    assert_stopped_cleanly(run, root)
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert_saved_at_window_end(state, 4)
    at_step_4 = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}

    codes, log = job.run("requeued", run, *command, restarts=1)  # what SLURM starts again: same command and id
    assert codes == [0], log[-3000:]
    assert f"SLURM restarted this job (SLURM_RESTART_COUNT=1): resuming from {last}" in log
    assert job.scontrol_calls == [f"requeue {job.id}"]  # the signal callback did not fire again

    codes, log = job.run("whole", tmp_path / "whole", "data.num_workers=1")
    assert codes == [0], log[-3000:]
    whole = weights(tmp_path / "whole")
    assert max_abs_diff(whole, {k: at_step_4[k] for k in whole}) > 1e-3  # steps 5-8 moved the weights
    assert max_abs_diff(weights(run), whole) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("workers", [[], ["data.num_workers=1", "group=true"]], ids=["alone", "with-a-worker"])
def test_sigterm_saves_at_the_window_end_and_stops_without_requeueing(tmp_path, hf_cache, workers):
    """With a DataLoader worker and the signal sent to the whole process group, as SLURM does, the
    worker ignores it (else its death would end the run before the save)."""
    job = Job(tmp_path, hf_cache)
    run = tmp_path / "outputs" / "dsft" / job.id
    signal = signal_at(3, "signal=SIGTERM", *[w for w in workers if w.startswith("group")])
    codes, log = job.run("stopped", run, *signal, *[w for w in workers if w.startswith("data.")])
    assert codes == [143], log[-3000:]  # not 0: Lightning's SIGTERMException (mid-window) did not happen
    assert job.scontrol_calls == []
    last = run / "checkpoints" / "last.ckpt"
    assert f"Preempted (SIGTERM at step 4): checkpoint saved to {last}; not requeued (resume with ckpt_path=last " \
           f"paths.output_dir={run})" in log
    assert_stopped_cleanly(run, tmp_path / "outputs")
    assert_saved_at_window_end(torch.load(last, map_location="cpu", weights_only=False), 4)


@pytest.mark.slow
def test_zero3_ranks_agree_when_one_is_signalled_and_the_requeued_job_ends_where_an_uninterrupted_one_does(
        tmp_path, hf_cache):
    job = Job(tmp_path, hf_cache, job_id="4243")
    run = tmp_path / "outputs" / "dsft" / job.id
    command = [*ZERO3, *signal_at(1, "rank=1")]
    codes, log = job.run("preempted", run, *command, ntasks=2)
    assert codes == [75, 75], log[-3000:]  # rank 0 never got the signal: it learnt it at the window end
    assert job.scontrol_calls == [f"requeue {job.id}"]  # from rank 0 only
    last = run / "checkpoints" / "last.ckpt"
    assert f"Preempted (SIGUSR1 at step 2): checkpoint saved to {last}; requeued SLURM job {job.id}" in log
    assert_stopped_cleanly(run, tmp_path / "outputs")
    shards = sorted(p.name for p in (last / "checkpoint").glob("*_optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    client = torch.load(last / "checkpoint" / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    assert_saved_at_window_end(client, 2, world_size=2)

    codes, log = job.run("requeued", run, *command, ntasks=2, restarts=1)
    assert codes == [0, 0], log[-3000:]
    assert f"resuming from {last}" in log
    codes, log = job.run("whole", tmp_path / "whole", *ZERO3, ntasks=2)
    assert codes == [0, 0], log[-3000:]
    assert max_abs_diff(weights(run), weights(tmp_path / "whole")) <= TOL


# --- fast: the handler, the decision, the resume rule, the config -------------------------------------

def test_the_handler_only_raises_the_flag_and_sigterm_outranks_a_requeue():
    preemption = Preemption()
    assert preemption.flag == NONE
    preemption.on_signal(signal.SIGUSR1)
    assert preemption.flag == REQUEUE
    preemption.on_signal(signal.SIGTERM)
    preemption.on_signal(signal.SIGUSR1)
    assert preemption.flag == STOP


SLURM_TASK = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1",
              "SLURM_JOB_NAME": "zephyr", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


def test_ours_replace_lightnings_slurm_handlers_from_setup_to_teardown(monkeypatch):
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    assert trainer._accelerator_connector.cluster_environment.auto_requeue  # Lightning would save in its handler
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    preemption = Preemption()
    preemption.setup(trainer, None, "fit")
    try:
        trainer._signal_connector.register_signal_handlers()  # what Trainer._run calls before the fit loop
        assert signal.getsignal(signal.SIGUSR1) == signal.getsignal(signal.SIGTERM) == preemption.on_signal
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.flag == REQUEUE and not trainer.received_sigterm
    finally:
        preemption.teardown(trainer, None, "fit")
    assert {s: signal.getsignal(s) for s in before} == before
    assert "register_signal_handlers" not in vars(trainer._signal_connector)


class FakeTrainer(SimpleNamespace):
    """What ``Preemption`` touches on a trainer, recording the order of what it does in ``events``."""

    def __init__(self, events: list[str], window_ends: bool, rank: int = 0, others: int = NONE) -> None:
        def reduce(tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:  # the other ranks' flags: ``others``
            events.append(f"reduce {reduce_op}")
            return torch.maximum(tensor, torch.tensor(others))

        strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce=reduce,
                                   barrier=lambda name=None: events.append("barrier"))
        super().__init__(strategy=strategy, is_global_zero=rank == 0, global_step=6, default_root_dir="/runs/a",
                         checkpoint_callback=None, fit_loop=SimpleNamespace(_should_accumulate=lambda: not window_ends),
                         save_checkpoint=lambda path: events.append(f"save {path}"))


def test_a_flag_waits_for_the_window_end_then_save_requeue_barrier_exit(monkeypatch):
    events: list[str] = []
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setattr("zephyr_lit.preemption.requeue", lambda job_id: events.append(f"requeue {job_id}"))
    preemption = Preemption()
    preemption.on_signal(signal.SIGUSR1)
    preemption.on_train_batch_end(FakeTrainer(events, window_ends=False), None)
    assert events == []  # mid-window: not even the all-reduce
    with pytest.raises(Preempted) as stopped:
        preemption.on_train_batch_end(FakeTrainer(events, window_ends=True), None)
    assert events == ["reduce max", "save /runs/a/checkpoints/last.ckpt", "requeue 77", "barrier"]
    assert stopped.value.exit_code == 75
    assert str(stopped.value) == ("Preempted (SIGUSR1 at step 6): checkpoint saved to /runs/a/checkpoints/last.ckpt; "
                                  "requeued SLURM job 77 (it resumes from there by itself)")


def test_an_unsignalled_rank_follows_the_others_and_sigterm_anywhere_means_no_requeue(monkeypatch):
    events: list[str] = []
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setattr("zephyr_lit.preemption.requeue", lambda job_id: events.append(f"requeue {job_id}"))
    quiet = Preemption()
    quiet.on_train_batch_end(FakeTrainer(events, window_ends=True), None)  # nobody signalled: train on
    assert events == ["reduce max"]
    with pytest.raises(Preempted) as stopped:  # another rank got SIGTERM
        quiet.on_train_batch_end(FakeTrainer(events, window_ends=True, others=STOP), None)
    assert stopped.value.exit_code == 143 and "requeue 77" not in events
    with pytest.raises(Preempted) as stopped:  # another rank got SIGUSR1; this one is not rank 0
        quiet.on_train_batch_end(FakeTrainer(events, window_ends=True, rank=1, others=REQUEUE), None)
    assert stopped.value.exit_code == 75 and "requeue 77" not in events and "rank 0 requeues" in str(stopped.value)


@pytest.mark.parametrize("env, job_id, restarts", [
    ({"SLURM_JOB_ID": "12"}, "12", 0),
    ({"SLURM_JOB_ID": "12", "SLURM_RESTART_COUNT": "2"}, "12", 2),
    ({"SLURM_JOB_ID": "19", "SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "3"}, "12_3", 0),
    ({}, None, 0),
])
def test_the_job_id_to_requeue_and_the_restart_count(env, job_id, restarts):
    assert slurm_job_id(env) == job_id and slurm_restarts(env) == restarts


@pytest.fixture
def run_with_last(tmp_path) -> Path:
    (tmp_path / "checkpoints" / "last.ckpt").mkdir(parents=True)
    return tmp_path


def test_a_requeued_job_resumes_from_its_last_checkpoint(run_with_last, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with caplog.at_level(logging.INFO, logger="zephyr_lit.run"):
        assert resolve_ckpt_path(None, run_with_last) == str(run_with_last / "checkpoints" / "last.ckpt")
    assert "SLURM restarted this job (SLURM_RESTART_COUNT=1): resuming from" in caplog.text


def test_an_explicit_ckpt_path_wins_over_the_automatic_resume(run_with_last, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resolve_ckpt_path("/elsewhere/step=5.ckpt", run_with_last) == "/elsewhere/step=5.ckpt"


def test_no_restart_or_no_checkpoint_starts_from_scratch(run_with_last, tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert resolve_ckpt_path(None, run_with_last) is None  # a first job in a reused folder does not resume by itself
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resolve_ckpt_path(None, tmp_path / "empty") is None  # requeued before its first checkpoint


def test_bad_preemption_settings_are_reported_with_the_fix(make_cfg):
    cfg = make_cfg("callbacks.preemption.requeue_signal=SIGTERM", "callbacks.preemption.requeue_exit_code=0",
                   "callbacks.preemption.stop_exit_code=0")
    problems = [p for p in config_problems(cfg) if p.startswith("callbacks.preemption")]
    assert problems == [
        "callbacks.preemption.requeue_signal=SIGTERM: must name a signal a handler can catch, other than SIGTERM "
        "and SIGINT, e.g. SIGUSR1 (as in #SBATCH --signal=USR1@600)",
        "callbacks.preemption.requeue_exit_code=0: must be an integer in 3..255 (0 is success, 1 an error, 2 a "
        "usage error)",
        "callbacks.preemption.stop_exit_code=0: must be an integer in 3..255 (0 is success, 1 an error, 2 a usage "
        "error)",
        "callbacks.preemption.stop_exit_code=0: must differ from requeue_exit_code, so that a requeued job and a "
        "stopped one can be told apart",
    ]
    assert not [p for p in config_problems(make_cfg("callbacks.preemption.requeue_signal=USR1"))
                if p.startswith("callbacks.preemption")]
