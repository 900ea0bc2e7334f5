"""The frozen reference model of DPO: freeze, TR-DPO mix-up, and the precomputed log-prob cache."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from zephyr_lit.zero3 import is_partitioned


@dataclass
class ReferenceSettings:
    """``dpo.ref.*``.

    precompute: compute reference log-probs once before training, cache them, free the model.
    cache_dir: where the cache lives (shared across runs; keyed by model, data and length settings).
    sync_steps: TR-DPO: every N optimizer steps ``ref <- alpha * policy + (1 - alpha) * ref``.
    mixup_alpha: that alpha.
    """

    precompute: bool = False
    cache_dir: str = "outputs/cache"
    sync_steps: int | None = None
    mixup_alpha: float = 0.6


def freeze(model: nn.Module) -> nn.Module:
    """No gradients, eval mode (no dropout): the reference is a fixed function."""
    model.requires_grad_(False)
    return model.eval()


@torch.no_grad()
@torch.no_grad()
def mixup_(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO soft update, in place: ``ref <- alpha * policy + (1 - alpha) * ref`` for every parameter.

    Under ZeRO-3 (every rank must call it) each pair of submodules is gathered in turn, mixed on
    rank 0 and re-partitioned from there, so no rank holds more than one layer in full."""

    def mix(ref_params: list[nn.Parameter], policy_params: list[nn.Parameter]) -> None:
        for ref_param, policy_param in zip(ref_params, policy_params, strict=True):
            ref_param.mul_(1.0 - alpha).add_(policy_param.detach().to(ref_param.dtype), alpha=alpha)

    if not is_partitioned(reference):
        mix(list(reference.parameters()), list(policy.parameters()))
        return
    import deepspeed
    import torch.distributed as dist

    for ref_module, policy_module in zip(reference.modules(), policy.modules(), strict=True):
        ref_params = list(ref_module.parameters(recurse=False))
        policy_params = list(policy_module.parameters(recurse=False))
        if ref_params:
            with deepspeed.zero.GatheredParameters(policy_params, modifier_rank=None):  # read only
                with deepspeed.zero.GatheredParameters(ref_params, modifier_rank=0):  # rank 0's result kept
                    if dist.get_rank() == 0:
                        mix(ref_params, policy_params)


def weights_identity(name_or_path: str, revision: str | None) -> str:
    """What identifies the weights behind ``name_or_path`` without reading them: for a local folder
    the weight files' real paths, sizes and modification times; for a hub name, name and revision."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return f"hub:{name_or_path}@{revision or 'main'}"
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return json.dumps([(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def save_logps(path: Path, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Write ``{chosen, rejected}`` (each ``(N,)`` fp32, by example index) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"chosen": chosen.cpu().float(), "rejected": rejected.cpu().float()}, tmp)
    os.replace(tmp, path)


def load_logps(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not path.exists():
        return None
    data = torch.load(path, map_location="cpu")
    return data["chosen"], data["rejected"]
