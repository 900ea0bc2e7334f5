"""Callbacks: validation before the first optimizer step and on the final weights, checkpoints only at
accumulation-window ends, throughput."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from zephyr_lit.windows import window_ends


def run_validation(trainer: L.Trainer) -> None:
    """Run the fit loop's validation loop now, the way the epoch loop does between steps."""
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    val_loop.setup_data()
    if not trainer.val_dataloaders:
        return
    was_training = trainer.training
    trainer.validating = True
    val_loop.run()
    trainer.training = was_training


class ValidateAtEdges(L.Callback):
    """Validate at the start of fit (the untrained baseline) and at the end, unless the last
    optimizer step was just validated. This holds whatever ``max_steps`` or ``max_epochs`` is.
    A resumed run keeps the baseline of the run it continues (saved in the checkpoint) and does not
    validate again before its first step."""

    def __init__(self) -> None:
        self.validated_at_step: int | None = None
        self.initial_metrics: dict[str, float] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_at_step = trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0:  # resumed: the baseline is the one in the checkpoint
            return
        run_validation(trainer)
        self.initial_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def state_dict(self) -> dict[str, Any]:
        return {"initial_metrics": self.initial_metrics, "validated_at_step": self.validated_at_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial_metrics = dict(state_dict.get("initial_metrics", {}))
        self.validated_at_step = state_dict.get("validated_at_step")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.validated_at_step != trainer.global_step:
            run_validation(trainer)


class WindowCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that saves during training only when a micro-batch closes its
    accumulation window, so a checkpoint never holds half a window (whose gradient it could not keep).

    Lightning's own rule saves at the first micro-batch whose ``global_step`` is a multiple of
    ``every_n_train_steps`` and was not saved yet; after a resume from such a step, with accumulation,
    that would be the next window's first micro-batch. Here the resumed step counts as saved."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        if window_ends(trainer):
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)


class Throughput(L.Callback):
    """Training speed after ``warmup`` batches, on this rank, and peak memory: ``stats`` holds
    ``samples_per_s`` (rows; a DPO pair is 2 rows, so pairs/s = rows/s / 2), ``tokens_per_s`` (real,
    non-pad tokens), and ``peak_memory_gib`` (max allocated on CUDA, else peak RSS of the process)."""

    def __init__(self, warmup: int = 3) -> None:
        self.warmup = warmup
        self.stats: dict[str, float] = {}
        self._batches = self._rows = self._tokens = 0
        self._time = 0.0
        self._started: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._batches += 1
        if self._batches > self.warmup and self._started is not None:
            self._time += time.perf_counter() - self._started
            self._rows += int(batch["num_rows"]) if "num_rows" in batch else int(batch["input_ids"].shape[0])
            self._tokens += int(batch["num_tokens"]) if "num_tokens" in batch else int(batch["input_ids"].numel())

    def on_train_end(self, trainer, pl_module) -> None:
        if self._time > 0:
            self.stats = {"samples_per_s": self._rows / self._time, "tokens_per_s": self._tokens / self._time,
                          "timed_batches": self._batches - self.warmup}
        self.stats["peak_memory_gib"] = peak_memory_gib(pl_module.device)

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


def peak_memory_gib(device: torch.device) -> float:
    """Max allocated CUDA memory on ``device``, or this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
