"""Test-only: our DeepSpeed strategy (``zephyr_lit.checkpointing``) on CPU processes (gloo), so CI
exercises real ZeRO-3.

Lightning refuses a non-CUDA accelerator only in ``setup_environment`` and validates GPU indices in
``setup_distributed``; DeepSpeed needs ``DS_ACCELERATOR=cpu`` (set before it is imported) and a root
device with an index (it checks ``device_rank >= 0``). The shared-memory collective extension that
DeepSpeed would compile on first use (~60 s) is marked unavailable: gloo does the collectives.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from lightning.fabric.utilities.seed import reset_seed  # noqa: E402

from zephyr_lit.checkpointing import DeepSpeedStrategy  # noqa: E402


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Our DeepSpeed strategy (atomic sharded checkpoints) running ZeRO on CPU processes with the gloo
    backend. Not for real training."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        DDPStrategy.setup_environment(self)  # skips the CUDA-only guard; calls our setup_distributed

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)
