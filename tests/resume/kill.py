"""A callback that SIGKILLs its own process part-way through training, as a lost node would.

``+callbacks.kill._target_=tests.resume.kill.KillAfter +callbacks.kill.step=K``: once the optimizer
has taken ``step`` steps (the checkpoint of step ``step`` is then on disk when the checkpoint
cadence divides it), the process dies at the start of its ``batches``-th micro-batch after that, so
that work past the checkpoint is lost (with accumulation, in the middle of a window)."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAfter(L.Callback):
    def __init__(self, step: int, batches: int = 2) -> None:
        self.step, self.batches, self.seen = step, batches, 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            self.seen += 1
            if self.seen >= self.batches:
                os.kill(os.getpid(), signal.SIGKILL)
