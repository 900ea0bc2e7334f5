"""Test callbacks: a NaN in one rank's gradients at one optimizer step, and what the weights did there.

``InjectNaN(step, rank)``: after backward of the micro-batch that closes the window of optimizer step
``step`` (1-based), on rank ``rank`` only, one gradient element becomes NaN (under DeepSpeed: one element
of the ZeRO optimizer's reduced gradient partition, just before the step). ``record`` (a folder) gets
``rank<r>.json``: per step whether the trained weights changed and the AdamW step counts."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from zephyr_lit.windows import window_ends


class InjectNaN(L.Callback):
    def __init__(self, step: int, rank: int = 0, record: str | None = None) -> None:
        self.step, self.rank = step, rank
        self.record = None if record is None else Path(record)
        self.facts: dict[str, list] = {"changed": [], "adam_steps": [], "skipped": []}
        self._before: torch.Tensor | None = None

    def _hit(self, trainer) -> bool:
        return trainer.global_step + 1 == self.step and trainer.global_rank == self.rank and window_ends(trainer)

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._hit(trainer) and not isinstance(trainer.strategy, DeepSpeedStrategy):
            grad = next(p for p in pl_module.trained_model.parameters() if p.grad is not None).grad
            grad.view(-1)[0] = float("nan")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._hit(trainer) and isinstance(trainer.strategy, DeepSpeedStrategy):
            trainer.strategy.model.optimizer.grad_partitions_flat_buffer[0] = float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.record is not None and trainer.strategy.__class__.__name__ != "CPUDeepSpeedStrategy":
            self._before = torch.cat([p.detach().flatten() for p in pl_module.trained_model.parameters()]).clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.record is None or self._before is None or not window_ends(trainer):
            return
        after = torch.cat([p.detach().flatten() for p in pl_module.trained_model.parameters()])
        self.facts["changed"].append(not torch.equal(after, self._before))
        states = trainer.optimizers[0].state.values()
        self.facts["adam_steps"].append(sorted({int(s["step"]) for s in states if "step" in s}))
        self.facts["skipped"].append(pl_module.nonfinite.skipped)
        self.record.mkdir(parents=True, exist_ok=True)
        (self.record / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.facts))
