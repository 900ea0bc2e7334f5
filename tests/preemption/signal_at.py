"""A callback that signals its own process at a chosen point of training, as SLURM or scancel would.

``+callbacks.signal._target_=tests.preemption.signal_at.SignalAt +callbacks.signal.step=K``: at the first
micro-batch after ``K`` optimizer steps (with accumulation, the first of a window: mid-window) this
process sends itself ``signal``; only on ``rank`` when given; with ``group=true`` to its whole process
group instead (SLURM signals every process of a job step: DataLoader workers and srun too)."""

from __future__ import annotations

import os
import signal as signals

import lightning as L


class SignalAt(L.Callback):
    def __init__(self, step: int, signal: str = "SIGUSR1", rank: int | None = None, group: bool = False) -> None:
        self.step, self.signal, self.rank, self.group = step, signals.Signals[signal], rank, group
        self.sent = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self.sent or trainer.global_step != self.step or self.rank not in (None, trainer.global_rank):
            return
        self.sent = True
        if self.group:
            os.killpg(os.getpgid(0), self.signal)
        else:
            os.kill(os.getpid(), self.signal)
