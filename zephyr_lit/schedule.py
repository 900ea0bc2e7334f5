"""Learning-rate schedules with linear warmup, as multipliers of the peak rate."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "linear", "constant")


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based).

    Warmup: ``(step + 1) / warmup_steps`` up to 1. Then, with ``p = (step - warmup) / (total - warmup)``:
    cosine ``0.5 * (1 + cos(pi * p))``, linear ``1 - p``, constant ``1``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def build_scheduler(optimizer: Optimizer, schedule: str, total_steps: int, warmup_ratio: float) -> LambdaLR:
    warmup_steps = math.ceil(warmup_ratio * total_steps)
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, warmup_steps, schedule))
