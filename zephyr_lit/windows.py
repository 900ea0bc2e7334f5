"""Accumulation windows: one rule for the sampler, Lightning's step counter and DeepSpeed's boundary.

A window is ``accumulate`` consecutive micro-batches counted from the start of each epoch; when an
epoch's batch count is not a multiple of ``accumulate`` its last window is shorter, and it still ends
in an optimizer step. ``WindowBatchSampler`` cuts its windows (and counts their tokens) by this rule,
and so does Lightning on its own (``_TrainingEpochLoop._should_accumulate``: the step counter, the LR
schedule, ``estimated_stepping_batches = ceil(batches / accumulate) x epochs``), with one exception:
under a strategy that accumulates itself (DeepSpeed) Lightning does not step on an epoch's short
last window, and DeepSpeed counts micro-steps over the whole run, so its windows straddle epochs.
``align_windows`` restores the rule there, and ``mark_boundary`` tells the DeepSpeed engine before
each micro-batch whether it ends a window.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import DeepSpeedStrategy


def window_ends(trainer: L.Trainer) -> bool:
    """True during the micro-batch that closes its window (the optimizer steps after it)."""
    return not trainer.fit_loop._should_accumulate()


def align_windows(trainer: L.Trainer) -> None:
    """Make Lightning step on an epoch's last micro-batch under strategies that accumulate themselves.

    Lightning's rule, ``not (window full or epoch's last batch)``, is what it uses without such a
    strategy; with one it drops the second term. Idempotent."""
    loop = trainer.fit_loop.epoch_loop
    if not trainer.strategy.handles_gradient_accumulation or getattr(loop, "_zephyr_windows", False):
        return

    def should_accumulate() -> bool:
        return not (loop._accumulated_batches_reached() or loop._num_ready_batches_reached())

    loop._should_accumulate = should_accumulate
    loop._zephyr_windows = True


def mark_boundary(trainer: L.Trainer) -> None:
    """Before a micro-batch's forward: tell the DeepSpeed engine whether this micro-batch ends a window,
    so that it reduces and steps exactly when Lightning counts an optimizer step."""
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy) and strategy.model is not None:
        strategy.model.set_gradient_accumulation_boundary(window_ends(trainer))
