"""Optimizer choices that need a particular device (``conf/optim/``).

``optim=paged_adamw_32bit`` is bitsandbytes' ``PagedAdamW32bit``: its states live in CUDA unified memory,
so it only means something on a CUDA device. On CPU bitsandbytes 0.50 falls back to a non-paged AdamW
with a warning, which would make a CPU run look like it tested the paged optimizer; the config check
refuses it instead (``optimizer_problems``, called by ``zephyr_lit.config.config_problems``).
"""

from __future__ import annotations

import importlib.util

from omegaconf import DictConfig, OmegaConf

CUDA_ONLY_PREFIX = "bitsandbytes.optim."  # every bitsandbytes optimizer: paged, 8-bit, ...
CUDA_ACCELERATORS = ("gpu", "cuda", "auto")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def optimizer_problems(cfg: DictConfig) -> list[str]:
    """A bitsandbytes optimizer without bitsandbytes installed, or where its step would not run on a CUDA
    device: ``trainer.accelerator`` not gpu/cuda/auto, no CUDA device here, or DeepSpeed offloading the
    optimizer to CPU/NVMe."""
    target = str(OmegaConf.select(cfg, "optim.optimizer._target_", default="") or "")
    if not target.startswith(CUDA_ONLY_PREFIX):
        return []
    if importlib.util.find_spec("bitsandbytes") is None:
        return [f"optim.optimizer._target_={target}: needs the bitsandbytes package: pip install 'zephyr-lit[qlora]'"]
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    offload = OmegaConf.select(cfg, "strategy.config.zero_optimization.offload_optimizer.device", default=None)
    where = None
    if accelerator not in CUDA_ACCELERATORS:
        where = f"trainer.accelerator={accelerator}"
    elif not cuda_available():
        where = "no CUDA device here"
    elif str(offload) in ("cpu", "nvme"):
        where = f"DeepSpeed offloads the optimizer to {offload}"
    if where is None:
        return []
    return [f"optim.optimizer._target_={target}: a bitsandbytes optimizer steps on CUDA only ({where}); "
            "use optim=adamw here"]
