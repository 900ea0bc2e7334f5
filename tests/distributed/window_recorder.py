"""A callback for the accumulation-window tests: every micro-batch each rank trained on, and the
trained model's full weights before the first optimizer step and after each one.

Added from the command line (or a composed config), so the real launch path is what gets tested::

    +callbacks.window_recorder._target_=tests.distributed.window_recorder.WindowRecorder
    +callbacks.window_recorder.out_dir=/some/folder

Writes ``<out_dir>/rank<R>.pt``: ``batches`` (``[(step, {tensor name: tensor})]``: the optimizer step
each micro-batch belongs to, i.e. ``global_step`` when it started), ``weights`` (rank 0: the gathered
state dict before step 0 and after each step; other ranks: empty), ``global_step``,
``estimated_stepping_batches`` and, under DeepSpeed, the engine's own ``global_steps``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from zephyr_lit.zero3 import gathered_state_dict

KEYS = ("input_ids", "attention_mask", "position_ids", "labels", "index", "window_tokens", "window_rows")


class WindowRecorder(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.batches: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        self._step_at_start = 0

    def _snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = gathered_state_dict(pl_module.trained_model)  # every rank takes part; rank 0 keeps it
        if trainer.is_global_zero and state is not None:
            self.weights.append({k: v.float().clone() for k, v in state.items()})

    def on_train_start(self, trainer, pl_module) -> None:
        self._snapshot(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_start = trainer.global_step
        self.batches.append((trainer.global_step, {k: batch[k].detach().cpu().clone() for k in KEYS if k in batch}))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._step_at_start:  # an optimizer step just happened
            self._snapshot(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        engine = getattr(trainer.strategy, "model", None)
        payload = {
            "batches": self.batches,
            "weights": self.weights,
            "global_step": trainer.global_step,
            "estimated_stepping_batches": int(trainer.estimated_stepping_batches),
            "engine_global_steps": getattr(engine, "global_steps", None),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(payload, self.out_dir / f"rank{trainer.global_rank}.pt")
