"""Preemption: on a signal, save ``last.ckpt`` at the next accumulation-window end, requeue on SLURM, exit.

The sbatch template asks SLURM for ``--signal=USR1@600``: every task gets SIGUSR1 ten minutes before the
time limit. ``scancel`` and the time limit itself send SIGTERM (SIGKILL follows after KillWait, 30 s by
default). ``Preemption`` owns both signals from ``setup`` to ``teardown``:

- the handler only raises a flag (``REQUEUE`` for the requeue signal, ``STOP`` for SIGTERM): no I/O, no
  collectives, whatever the rank is doing when the signal lands;
- at each window end every rank all-reduces its flag (MAX, so SIGTERM anywhere beats a requeue, and
  ranks signalled at different moments decide alike); when it is set, every rank saves one complete
  checkpoint with ``trainer.save_checkpoint`` to the checkpoint callback's ``last.ckpt``, rank 0 runs
  ``scontrol requeue <job id>`` (``REQUEUE`` only), all wait for it, then all raise ``Preempted``;
- ``zephyr_lit.run.train`` turns ``Preempted`` into one printed line and ``SystemExit``: exit code 75
  (EX_TEMPFAIL) after a requeue, 143 (128 + SIGTERM) after a stop; nothing exported, no summary, no
  ``latest``. The requeued job keeps its id, so its run folder, and ``run.resolve_ckpt_path`` resumes it.

Lightning 2.6 registers its own handlers in ``Trainer._run`` (``_SignalConnector.register_signal_handlers``)
just before the fit loop: with a ``SLURMEnvironment`` a SIGUSR1 handler that saves a checkpoint from inside
the handler (mid-step: under ZeRO-3 a collective save that can deadlock, and half a window lost), and always
a SIGTERM handler that broadcasts from inside the handler and makes the loops raise ``SIGTERMException``
(exit code 0, mid-window). ``setup`` turns that registration off for this fit, so neither exists.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

from zephyr_lit.windows import window_ends

NONE, REQUEUE, STOP = 0, 1, 2  # the flag; ranks agree on the largest
# not for the requeue signal: SIGTERM stops without requeueing, SIGINT is Ctrl+C, the others cannot be caught
RESERVED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGKILL, signal.SIGSTOP)


def signal_named(name: str) -> signal.Signals | None:
    """``SIGUSR1`` or ``USR1`` (sbatch's spelling) -> ``signal.SIGUSR1``; None if there is no such signal."""
    name = str(name).upper()
    return getattr(signal.Signals, name if name.startswith("SIG") else f"SIG{name}", None)


def slurm_job_id(env: Mapping[str, str] | None = None) -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job id>_<task id>`` for an array task, else ``SLURM_JOB_ID``."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def slurm_restarts(env: Mapping[str, str] | None = None) -> int:
    """``SLURM_RESTART_COUNT``: how often SLURM restarted this job (requeued, or after a node failure); 0 if unset."""
    env = os.environ if env is None else env
    try:
        return int(env.get("SLURM_RESTART_COUNT", "") or 0)
    except ValueError:
        return 0


def requeue(job_id: str) -> str | None:
    """Run ``scontrol requeue <job_id>``; None when it worked, else what went wrong."""
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"scontrol failed: {error}"
    return None if done.returncode == 0 else f"scontrol exit {done.returncode}: {done.stderr.strip()[-200:]}"


class Preempted(Exception):
    """Raised on every rank once the checkpoint is saved (and the job requeued); ``exit_code`` is the process's."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Preemption(L.Callback):
    """Save at the next window end after ``requeue_signal`` or SIGTERM, requeue (``requeue_signal`` only), exit.

    ``requeue_exit_code``: the exit code after the requeue signal (also outside SLURM, or if the requeue
    failed: the printed line says so); ``stop_exit_code``: after SIGTERM."""

    def __init__(self, requeue_signal: str = "SIGUSR1", requeue_exit_code: int = 75, stop_exit_code: int = 143) -> None:
        self.requeue_signal = signal_named(requeue_signal)
        self.exit_codes = {REQUEUE: requeue_exit_code, STOP: stop_exit_code}
        self.flag = NONE
        self._previous: dict[signal.Signals, Any] = {}  # the handlers found at setup
        self._connector: Any = None  # Lightning's _SignalConnector, while its registration is turned off

    def on_signal(self, signum: int, frame: Any = None) -> None:
        """The handler: raise the flag, nothing else."""
        self.flag = max(self.flag, STOP if signum == signal.SIGTERM else REQUEUE)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.flag = NONE
        self._connector = trainer._signal_connector  # Lightning 2.6: registers its handlers later in fit
        self._connector.register_signal_handlers = lambda: None
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works only there (Lightning's would not be installed either)
        for signum in (self.requeue_signal, signal.SIGTERM):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self.on_signal)

    def restore(self) -> None:
        """Put back the handlers found at ``setup``, and Lightning's registration."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
        if self._connector is not None:
            vars(self._connector).pop("register_signal_handlers", None)
            self._connector = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.restore()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        if not window_ends(trainer):
            return
        # one small all-reduce per window end, on every rank: all see the same decision
        mine = torch.tensor(self.flag, device=trainer.strategy.root_device)
        if (flag := int(trainer.strategy.reduce(mine, reduce_op="max"))) != NONE:
            self.stop(trainer, flag)

    def stop(self, trainer: L.Trainer, flag: int) -> None:
        """Save ``last.ckpt`` on every rank, requeue from rank 0 (``REQUEUE``), wait for it, raise ``Preempted``."""
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # ends with a barrier: complete on every rank
        what = f"{'SIGTERM' if flag == STOP else self.requeue_signal.name} at step {trainer.global_step}"
        message = f"Preempted ({what}): checkpoint saved to {path}; "
        by_hand = f"resume with ckpt_path=last paths.output_dir={path.parents[1]}"
        job_id = slurm_job_id()
        if flag == STOP:
            message += f"not requeued ({by_hand})"
        elif job_id is None:
            message += f"not a SLURM job, nothing requeued ({by_hand})"
        elif not trainer.is_global_zero:
            message += f"rank 0 requeues SLURM job {job_id}"
        elif (failed := requeue(job_id)) is None:
            message += f"requeued SLURM job {job_id} (it resumes from there by itself)"
        else:
            message += f"requeueing SLURM job {job_id} failed ({failed}): submit again and {by_hand}"
        trainer.strategy.barrier("preemption")  # no rank exits (srun --kill-on-bad-exit) before the requeue
        raise Preempted(message, self.exit_codes[flag])


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """The checkpoint callback's ``last.ckpt`` (``<default_root_dir>/checkpoints/last.ckpt`` without one)."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST))
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
