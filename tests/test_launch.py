"""Launching on a cluster: one run folder per launch on every rank, the sbatch template and the SLURM
launcher sized like trainer=gpu_2x8, the Hydra-multirun guard (Lightning #11300), and real launches
through torchrun, a stand-in srun, Lightning's own DDP children and submitit's local executor."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR
from tests.distributed.process import run_group
from zephyr_lit.launch import (
    RUN_ID_VAR,
    LaunchCheck,
    RunStampError,
    lightning_spawns,
    pin_run_stamp,
    run_stamp,
    shared_run_id,
)

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "zephyr_lit" / "launch" / "zephyr-2x8.sbatch"
# A few steps on the embedded default, nothing but CSV logs.
TINY = ["trainer.max_steps=2", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "data.max_train_samples=64", "data.max_eval_samples=16", "data.exact_match_path=null", "logger=csv"]
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
               "MASTER_ADDR", "MASTER_PORT", RUN_ID_VAR)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (the tests may themselves run under SLURM)."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "SRUN_", "TORCHELASTIC_"))}
    return {**env, **extra}


@pytest.fixture
def no_launcher_env(monkeypatch):
    monkeypatch.setenv(RUN_ID_VAR, "")  # recorded as unset, so a pinned id is removed after the test
    for key in list(os.environ):
        if key in LAUNCH_VARS or key.startswith(("SLURM_", "SRUN_", "TORCHELASTIC_")):
            monkeypatch.delenv(key)
    return monkeypatch


def compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def run_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name not in ("latest", "multirun"))


# --- ${run_stamp:} ---------------------------------------------------------------------------------

NOW = datetime(2026, 11, 25, 16, 0, 0)


@pytest.mark.parametrize("env, stamp", [
    ({}, "2026-11-25_16-00-00"),                                                  # one process: the clock
    ({RUN_ID_VAR: "mine", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, "mine"),    # explicit id first
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, "7"),                           # srun tasks
    ({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "3", "SLURM_NTASKS": "8"}, "7_3"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, "2026-11-25_16-00-00"),          # one task: the clock
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "WORLD_SIZE": "8", "TORCHELASTIC_RUN_ID": "none"}, "7"),
    ({"TORCHELASTIC_RUN_ID": "job-5", "WORLD_SIZE": "16"}, "job-5"),              # torchrun --rdzv-id job-5
    ({"TORCHELASTIC_RUN_ID": "1f0c-uuid", "WORLD_SIZE": "2"}, "1f0c-uuid"),       # torchrun --standalone
    ({"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "1"}, "2026-11-25_16-00-00"),
])
def test_run_stamp_is_what_every_rank_shares(env, stamp):
    assert run_stamp(env, now=NOW) == stamp


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none"}, {"SLURM_NTASKS": "2"},
                                 {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}])
def test_several_processes_without_a_shared_id_fail_with_the_fix(env):
    with pytest.raises(RunStampError, match=f"set {RUN_ID_VAR}.*paths.output_dir.*--rdzv-id"):
        run_stamp(env, now=NOW)


def test_the_resolver_reads_the_environment_once_per_config(no_launcher_env):
    no_launcher_env.setenv("TORCHELASTIC_RUN_ID", "job-5")
    no_launcher_env.setenv("WORLD_SIZE", "2")
    cfg = compose_with_hydra(["paths.root=/runs"])
    assert cfg.paths.output_dir == "/runs/dsft/job-5"
    assert cfg.hydra.sweep.dir == "/runs/dsft/multirun/job-5"
    no_launcher_env.setenv("TORCHELASTIC_RUN_ID", "job-6")  # cached, like ${now:}: a sweep keeps its folder
    assert cfg.paths.output_dir == "/runs/dsft/job-5"


def test_pin_run_stamp_pins_a_single_process_only(no_launcher_env):
    pin_run_stamp()
    pinned = os.environ[RUN_ID_VAR]
    assert datetime.strptime(pinned, "%Y-%m-%d_%H-%M-%S")
    no_launcher_env.setenv("WORLD_SIZE", "2")  # Lightning's child: inherits the parent's stamp
    assert run_stamp() == pinned
    no_launcher_env.delenv(RUN_ID_VAR)
    no_launcher_env.setenv("TORCHELASTIC_RUN_ID", "job-5")  # under torchrun nothing is pinned
    pin_run_stamp()
    assert RUN_ID_VAR not in os.environ and shared_run_id() == "job-5"


# --- who creates the ranks -------------------------------------------------------------------------

TORCHRUN_ENV = {"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}
SRUN_ENV = {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "zephyr", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_NNODES": "1", "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
            "SLURM_NODEID": "0"}


@pytest.mark.parametrize("devices, env, spawns", [
    (1, {}, False),
    (2, {}, True),                # python train.py trainer.devices=2: Lightning re-runs the command
    (2, TORCHRUN_ENV, False),     # torchrun created the ranks
    (2, SRUN_ENV, False),         # srun created the ranks
])
def test_lightning_spawns_only_without_a_cluster(no_launcher_env, devices, env, spawns):
    for key, value in env.items():
        no_launcher_env.setenv(key, value)
    cfg = compose_with_hydra(["trainer.accelerator=cpu", f"trainer.devices={devices}", "strategy=ddp"])
    assert lightning_spawns(cfg.trainer, cfg.strategy) is spawns


def test_an_unbuildable_trainer_is_left_to_the_trainer(no_launcher_env):
    cfg = compose_with_hydra(["trainer.accelerator=cpu", "trainer.devices=[5, 6]"])
    assert lightning_spawns(cfg.trainer, cfg.strategy) is False


@pytest.mark.parametrize("launcher, stops", [("basic", True), ("local_jobs", True), ("slurm_2x8", False)])
def test_launch_check_stops_a_local_sweep_whose_ranks_lightning_would_start(no_launcher_env, tmp_path,
                                                                            launcher, stops):
    cfg = compose_with_hydra([f"hydra/launcher={launcher}", f"paths.root={tmp_path}", "trainer.accelerator=cpu",
                              "trainer.devices=2"])
    if stops:
        with pytest.raises(SystemExit) as stopped:
            LaunchCheck().on_multirun_start(cfg)
        assert stopped.value.code == 2
    else:  # a SLURM job's tasks are its ranks: train.py checks inside each job
        LaunchCheck().on_multirun_start(cfg)


# --- the sbatch template and the SLURM launcher -----------------------------------------------------

def sbatch_options(text: str) -> dict[str, str]:
    """``#SBATCH --key=value`` / ``#SBATCH --flag`` lines (``##SBATCH`` is a comment)."""
    options = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            flag = line.split(None, 1)[1].strip()
            key, _, value = flag.partition("=")
            options[key.lstrip("-")] = value
    return options


def test_sbatch_template_matches_the_2x8_trainer(no_launcher_env):
    cfg = compose_with_hydra(["+experiment=zephyr-7b-beta-dsft"])
    options = sbatch_options(SBATCH.read_text())
    assert int(options["nodes"]) == cfg.trainer.num_nodes == 2
    assert int(options["ntasks-per-node"]) == cfg.trainer.devices == 8  # one task per rank
    assert int(options["gpus-per-node"]) == cfg.trainer.devices
    assert "exclusive" in options and options["time"] and int(options["cpus-per-task"]) >= 1
    assert "srun --kill-on-bad-exit=1 python train.py \"$@\"" in SBATCH.read_text()


def test_sbatch_template_warns_the_ranks_before_the_time_limit(no_launcher_env):
    """``--signal=USR1@600``: the requeue signal of ``callbacks.preemption``, to the tasks (no ``B:``), with a lead
    longer than a 7B ZeRO-3 save (~101.5 GB at 0.5 GB/s: ~203 s) and short against the 24 h limit."""
    cfg = compose_with_hydra(["+experiment=zephyr-7b-beta-dsft"])
    options = sbatch_options(SBATCH.read_text())
    name, _, lead = options["signal"].partition("@")
    assert "SIG" + name == cfg.callbacks.preemption.requeue_signal == "SIGUSR1"  # not B:USR1 (the batch shell)
    hours, minutes, seconds = (int(part) for part in options["time"].split(":"))
    assert 2 * 203 <= int(lead) <= (hours * 3600 + minutes * 60 + seconds) // 20
    assert "requeue" in options and options["open-mode"] == "append"  # the requeued job appends to its log


def test_slurm_launcher_submits_the_same_geometry(no_launcher_env, monkeypatch, tmp_path):
    """The sbatch script submitit writes for hydra/launcher=slurm_2x8, parameters mapped as the plugin does."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = compose_with_hydra(["+experiment=zephyr-7b-beta-dsft", "hydra/launcher=slurm_2x8", f"paths.root={tmp_path}"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    params = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_"), params.pop("submitit_folder")
    timeouts = params.pop("max_num_timeout")
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun here
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path, slurm_max_num_timeout=timeouts)
    base = {field.name for field in dataclasses.fields(BaseQueueConf)}
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    options = sbatch_options(executor._executor._make_submission_file_text("python -m x", "uid"))
    assert int(options["nodes"]) == cfg.trainer.num_nodes
    assert int(options["ntasks-per-node"]) == cfg.trainer.devices
    assert int(options["gpus-per-node"]) == cfg.trainer.devices
    assert "exclusive" in options


def fake_srun(bin_dir: Path, tasks: int, job_id: str) -> Path:
    """An ``srun`` that starts ``tasks`` copies of its command on this machine with the variables srun sets
    (one node), and records its arguments and environment."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "srun"
    script.write_text(f"""#!/bin/bash
echo "$@" > "{bin_dir}/args"; echo "$ZEPHYR_RUN_ID $SRUN_CPUS_PER_TASK $PWD" > "{bin_dir}/env"
shift  # --kill-on-bad-exit=1
pids=()
for ((r = 0; r < {tasks}; r++)); do
  SLURM_JOB_ID={job_id} SLURM_JOB_NAME=zephyr SLURM_NTASKS={tasks} SLURM_NTASKS_PER_NODE={tasks} SLURM_NNODES=1 \\
  SLURM_NODELIST=localhost SLURM_PROCID=$r SLURM_LOCALID=$r SLURM_NODEID=0 "$@" > "{bin_dir}/task$r.log" 2>&1 &
  pids+=($!)
done
rc=0; for p in "${{pids[@]}}"; do wait $p || rc=$?; done; exit $rc
""")
    script.chmod(0o755)
    return script


def test_sbatch_script_needs_the_experiment(tmp_path):
    result = subprocess.run(["bash", str(SBATCH)], env=clean_env(SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="1"),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage: sbatch" in result.stderr


@pytest.mark.slow
def test_sbatch_script_runs_srun_tasks_into_one_job_folder(tmp_path):
    """The template, run as sbatch would, with 2 CPU tasks: Lightning takes the ranks from SLURM."""
    job_id = str(random.randint(1000, 9999))  # Lightning's MASTER_PORT is 15000 + the job id's last 4 digits
    bin_dir = tmp_path / "bin"
    fake_srun(bin_dir, tasks=2, job_id=job_id)
    env = clean_env(SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID=job_id, SLURM_CPUS_PER_TASK="1",
                    PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}")  # `python`: this one
    overrides = [f"paths.root={tmp_path / 'runs'}", "trainer.accelerator=cpu", "trainer.devices=2", "strategy=ddp",
                 *TINY]
    result = run_group(["bash", str(SBATCH), *overrides], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    logs = "\n".join((bin_dir / f"task{r}.log").read_text()[-1500:] for r in range(2))
    assert result.returncode == 0, logs
    assert (bin_dir / "args").read_text().split() == ["--kill-on-bad-exit=1", "python", "train.py", *overrides]
    assert (bin_dir / "env").read_text().split() == [job_id, "1", str(REPO)]
    assert run_folders(tmp_path / "runs" / "dsft") == [tmp_path / "runs" / "dsft" / job_id]
    summary = json.loads((tmp_path / "runs" / "dsft" / job_id / "summary.json").read_text())
    assert summary["global_step"] == 2
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs  # the second task joined as rank 1


# --- real launches -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_ranks_share_one_run_folder(tmp_path):
    result = run_group(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "train.py",
         f"paths.root={tmp_path}", "trainer.accelerator=cpu", "trainer.devices=2", "strategy=ddp", *TINY],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    folders = run_folders(tmp_path / "dsft")
    assert len(folders) == 1  # named after TORCHELASTIC_RUN_ID, not each rank's clock
    assert json.loads((folders[0] / "summary.json").read_text())["output_dir"] == str(folders[0])


@pytest.mark.slow
def test_lightnings_own_children_write_to_the_parents_folder(tmp_path):
    """A plain run (not -m) with 2 devices: Lightning re-runs train.py for rank 1; the stamp is inherited."""
    result = run_group(
        [sys.executable, "train.py", f"paths.root={tmp_path}", "trainer.accelerator=cpu", "trainer.devices=2",
         "strategy=ddp", *TINY],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    folders = run_folders(tmp_path / "dsft")
    assert len(folders) == 1 and (folders[0] / "summary.json").exists()
    assert (folders[0] / "train_ddp_process_1.log").exists()  # rank 1 logged there too


def test_several_ranks_without_a_shared_id_stop_with_one_line(tmp_path):
    result = run_group([sys.executable, "train.py", f"paths.root={tmp_path}"], cwd=REPO,
                            env=clean_env(WORLD_SIZE="2"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: 2 processes and no run id they share")
    assert "Traceback" not in result.stderr and not (tmp_path / "dsft").exists()


@pytest.mark.parametrize("launcher", ["basic", "local_jobs"])
def test_multirun_with_lightning_spawned_ranks_fails_fast(tmp_path, launcher):
    result = run_group(
        [sys.executable, "train.py", "-m", f"hydra/launcher={launcher}", f"paths.root={tmp_path}",
         "trainer.accelerator=cpu", "trainer.devices=2", "optim.lr=1e-3,3e-3", *TINY],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: hydra multirun (-m) with more than one device" in result.stderr and "#11300" in result.stderr
    assert not list(tmp_path.glob("dsft/multirun/*/0/summary.json"))  # no job trained


@pytest.mark.slow
def test_submitit_local_sweep_writes_each_summary_and_the_table(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_group(
        [sys.executable, "train.py", "-m", "hydra/launcher=local_jobs", f"paths.root={tmp_path}",
         f"hydra.sweep.dir={sweep}", "optim.lr=1e-3,3e-3", *TINY],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job in (0, 1):  # submitit ran each job in its own process, in the sweep's numbered folder
        summary = json.loads((sweep / str(job) / "summary.json").read_text())
        assert summary["output_dir"] == str(sweep / str(job)) and summary["global_step"] == 2
        assert (sweep / str(job) / "model" / "model.safetensors").exists()
    assert list(sweep.glob(".submitit/*/*_0_result.pkl"))
    with open(sweep / "sweep_summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["rank"] for r in rows] == ["1", "2"]
    assert {r["overrides"] for r in rows} == {"optim.lr=0.001", "optim.lr=0.003"}
    assert "Sweep summary" in result.stdout
    assert not (tmp_path / "dsft").exists()  # nothing outside the sweep folder, no `latest` pointer
