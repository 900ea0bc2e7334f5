"""Launching on a cluster: one run folder per launch, whichever rank asks, and the Hydra-multirun guard.

``run_stamp()`` backs the ``${run_stamp:}`` resolver used in ``paths.output_dir`` and
``hydra.sweep.dir``. Under ``srun`` or ``torchrun`` every rank runs ``train.py`` and composes the
config itself, so a folder named after each rank's clock could differ between ranks; the stamp is
therefore taken from something every rank of one launch shares:

1. ``ZEPHYR_RUN_ID`` when set (the sbatch template exports ``$SLURM_JOB_ID``);
2. in a multi-process SLURM job, the job id (``<array job id>_<array task id>`` in an array);
3. under ``torchrun``, ``TORCHELASTIC_RUN_ID`` (``--rdzv-id``; a fresh uuid with ``--standalone``;
   ``none`` with the static rendezvous, which does not count);
4. a single process: the local time, ``%Y-%m-%d_%H-%M-%S``.

Several processes and none of 1-3: ``RunStampError`` (the user must name the run). ``train.py`` pins a
single process's timestamp in ``ZEPHYR_RUN_ID`` (``pin_run_stamp``) so that processes started from it
(Lightning's own DDP children, submitit's local jobs) resolve the same folder.

``lightning_spawns(trainer_cfg, strategy_cfg)`` tells whether Lightning would start the local ranks
itself (``_SubprocessScriptLauncher`` without a cluster environment that creates the processes).
Lightning re-runs ``sys.argv`` for each child (``_hydra_subprocess_cmd`` adds only ``hydra.run.dir``,
``hydra.job.name`` and ``hydra.output_subdir=null``), which under ``python train.py -m`` still holds
``-m`` and the sweep: each child starts the whole sweep again (Lightning issue #11300). ``LaunchCheck``
(before the jobs, for launchers that run them here) and ``train.py`` (in each job) refuse it.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from typing import Any, Mapping

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

RUN_ID_VAR = "ZEPHYR_RUN_ID"
STAMP_FORMAT = "%Y-%m-%d_%H-%M-%S"


class RunStampError(RuntimeError):
    """Several processes, and nothing they share to name the run folder."""


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env.get(key, "") or 0)
    except ValueError:
        return 0


def is_multi_process(env: Mapping[str, str] | None = None) -> bool:
    """The environment says this process is one of several ranks (torchrun, srun, Lightning's children)."""
    env = os.environ if env is None else env
    return _int(env, "WORLD_SIZE") > 1 or _int(env, "SLURM_NTASKS") > 1


def shared_run_id(env: Mapping[str, str] | None = None) -> str | None:
    """The id every rank of this launch sees (1-3 above), or None."""
    env = os.environ if env is None else env
    if env.get(RUN_ID_VAR):
        return env[RUN_ID_VAR]
    if env.get("SLURM_JOB_ID") and is_multi_process(env):
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        return env["SLURM_JOB_ID"]
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return env["TORCHELASTIC_RUN_ID"]
    return None


def run_stamp(env: Mapping[str, str] | None = None, now: datetime | None = None) -> str:
    """The last part of the run (and sweep) folder; the same on every rank of one launch."""
    env = os.environ if env is None else env
    shared = shared_run_id(env)
    if shared is not None:
        return shared
    if is_multi_process(env):
        raise RunStampError(
            f"{env.get('WORLD_SIZE') or env.get('SLURM_NTASKS')} processes and no run id they share, so "
            f"each rank would name its own run folder: set {RUN_ID_VAR} (e.g. to the job id) or "
            "paths.output_dir, or launch torchrun with --rdzv-id (or --standalone)"
        )
    return (now or datetime.now()).strftime(STAMP_FORMAT)


def pin_run_stamp() -> None:
    """In a single process, fix ``ZEPHYR_RUN_ID`` to the current stamp before Hydra composes.

    Processes started from this one (Lightning's own DDP children in a plain run, submitit's jobs)
    inherit it and resolve the same folder as their parent.
    """
    if not is_multi_process() and shared_run_id() is None:
        os.environ[RUN_ID_VAR] = run_stamp()


def _stamp_error(error: BaseException) -> RunStampError | None:
    while error is not None:
        if isinstance(error, RunStampError):
            return error
        error = error.__cause__ or error.__context__
    return None


# Launchers whose jobs run on this machine, in this environment: the sweep can be checked before any job.
LOCAL_LAUNCHERS = ("hydra._internal.core_plugins.basic_launcher.BasicLauncher",
                   "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class LaunchCheck(Callback):
    """Hydra callback (``hydra.callbacks.launch_check``), run before any job starts:

    - the run (or sweep) folder resolves: several ranks without a shared run id stop with one line and
      exit code 2 instead of a traceback;
    - a sweep whose jobs run here (basic or submitit-local launcher) stops if Lightning would start the
      ranks itself (#11300). ``train.py`` repeats that check in each job, where a SLURM job's
      environment is known.
    """

    def _resolve(self, config: DictConfig, key: str) -> None:
        try:
            OmegaConf.select(config, key)
        except Exception as error:  # noqa: BLE001
            stamp_error = _stamp_error(error)
            if stamp_error is None:
                raise
            _fail(str(stamp_error))

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._resolve(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._resolve(config, "hydra.sweep.dir")
        launcher = OmegaConf.select(config, "hydra.launcher._target_", default="")
        if launcher in LOCAL_LAUNCHERS and lightning_spawns(config.trainer, config.strategy):
            _fail(multirun_spawn_error())


def lightning_spawns(trainer_cfg, strategy_cfg) -> bool:
    """Would ``Trainer(**trainer_cfg, strategy=strategy_cfg)`` start the other local ranks itself?

    Decided the way the Trainer decides (Lightning's accelerator connector picks the accelerator,
    devices, cluster environment and strategy); False where that fails, since the Trainer will then
    report the problem itself.
    """
    from hydra.utils import instantiate
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    try:
        connector = _AcceleratorConnector(
            devices=trainer_cfg.get("devices", "auto"),
            num_nodes=trainer_cfg.get("num_nodes", 1),
            accelerator=trainer_cfg.get("accelerator", "auto"),
            strategy=instantiate(strategy_cfg),
            precision=trainer_cfg.get("precision"),
            deterministic=trainer_cfg.get("deterministic"),
            benchmark=trainer_cfg.get("benchmark"),
        )
    except Exception:  # noqa: BLE001  (no GPU, deepspeed missing, bad devices: the Trainer says so)
        return False
    launcher = connector.strategy.launcher
    return (
        isinstance(launcher, _SubprocessScriptLauncher)
        and launcher.num_processes > 1
        and not connector.cluster_environment.creates_processes_externally
    )


def multirun_spawn_error() -> str:
    return (
        "hydra multirun (-m) with more than one device per node, and no cluster creating the processes: "
        "Lightning would start the other ranks by re-running this command, -m included, so each would "
        "start the whole sweep again (Lightning issue #11300). Launch the sweep on SLURM with "
        "hydra/launcher=slurm_2x8 (one task per rank), run single runs under torchrun or srun, "
        "or sweep with trainer.devices=1"
    )
