"""DeepSpeed ZeRO-3 specifics: partition-aware loading and a consolidated 16-bit state dict.

Under ZeRO-3 every parameter is a flat shard on each rank (full shape only inside
``deepspeed.zero.GatheredParameters``; each carries a ``ds_id``). Two things follow:

- ``transformers`` loads weights shard-aware (and turns on ``synced_gpus`` in ``generate``) only
  while an ``HfDeepSpeedConfig`` object is alive, and it keeps only a weak reference to it: the
  module must hold one for as long as the models live (else every weight "mismatches" with shape [0]).
- an export must gather the shards: one submodule at a time, onto rank 0's CPU, so no rank ever
  holds a full copy of the model on its device.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy


def zero3_config(trainer: L.Trainer | None) -> dict | None:
    """The DeepSpeed config dict when ``trainer`` runs ZeRO stage 3, else None."""
    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, DeepSpeedStrategy) and strategy.config is not None and strategy.zero_stage_3:
        return strategy.config
    return None


def hf_deepspeed_config(config: dict):
    """An ``HfDeepSpeedConfig`` for ``config``: keep the returned object alive while loading and using the models."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(config)


def is_partitioned(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def gathered_state_dict(
    model: torch.nn.Module, keep: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor] | None:
    """The full state dict of ``model`` on rank 0's CPU (None on the other ranks).

    Partitioned (ZeRO-3) models are gathered one submodule at a time; every rank must call this.
    Parameters shared between submodules (same ``ds_id``) stay shared in the result. Without
    partitioning this is just ``model.state_dict()`` moved to CPU. With ``keep``, only the parameters
    whose names it accepts are gathered and returned (no buffers): e.g. an adapter's, not the base's.
    """
    if not is_partitioned(model):
        state = model.state_dict() if keep is None else {n: p for n, p in model.named_parameters() if keep(n)}
        return OrderedDict((k, v.detach().cpu()) for k, v in state.items())

    import deepspeed
    import torch.distributed as dist

    is_zero = dist.get_rank() == 0
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    seen: dict[int, str] = {}

    def visit(module: torch.nn.Module, prefix: str) -> None:
        named = [(n, p) for n, p in module.named_parameters(recurse=False) if keep is None or keep(prefix + n)]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            if is_zero:
                for name, param in named:
                    key = prefix + name
                    if param.ds_id in seen:
                        state[key] = state[seen[param.ds_id]]
                    else:
                        state[key] = param.detach().cpu().clone()
                        seen[param.ds_id] = key
                for name, buffer in module.named_buffers(recurse=False) if keep is None else ():
                    if buffer is not None and name not in module._non_persistent_buffers_set:
                        state[prefix + name] = buffer.detach().cpu().clone()
        for name, child in module.named_children():
            visit(child, prefix + name + ".")

    visit(model, "")
    return state if is_zero else None


@contextmanager
def hf_zero3_paused(held) -> Iterator[None]:
    """Within the block transformers builds models whole, as without ZeRO-3 (one rank may build one
    alone: the merged export); ``held`` (the live ``HfDeepSpeedConfig``, or None) is reinstated on exit."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if held is None or not is_deepspeed_zero3_enabled():
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(held)
