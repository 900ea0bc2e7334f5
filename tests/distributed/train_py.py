"""``python train.py ...`` (or ``torchrun ... train.py`` for several CPU ranks) in its own process group,
with a deadline, one intra-op thread per process, output appended to a log file; and the comparison of
two runs' exported weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.distributed.process import run_group

REPO = Path(__file__).resolve().parents[2]


def train_py(overrides: list[str], log: Path, ranks: int = 1, timeout: float = 300) -> int:
    """Run ``train.py`` with ``overrides`` (under torchrun with DDP over gloo for ``ranks`` > 1); its exit code."""
    if ranks == 1:
        command = [sys.executable, "train.py"]
    else:
        launcher = Path(sys.executable).with_name("torchrun")
        command = [str(launcher), "--standalone", f"--nproc-per-node={ranks}", "train.py",
                   "trainer.accelerator=cpu", f"trainer.devices={ranks}", "strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    with open(log, "a") as handle:
        return run_group(command + overrides, timeout, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT
                         ).returncode


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The exported weights of the run folder ``run``."""
    return load_file(run / "model" / "model.safetensors")


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
