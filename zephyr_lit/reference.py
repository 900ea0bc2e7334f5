"""The frozen reference model of DPO: freeze, TR-DPO mix-up, and the precomputed log-prob cache.

The cache has one owner, ``ReferenceCache``: its key (everything that changes the log-probs), the
pass that fills it (in the training step's precision context, rank-sharded and gathered, every row
checked), its load and save (rank 0 decides hit or miss for all ranks), and freeing the model.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from zephyr_lit.checkpointing import atomic_write
from zephyr_lit.zero3 import is_partitioned

log = logging.getLogger(__name__)


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


# ---- the precomputed log-prob cache ------------------------------------------------------------
CACHE_VERSION = "2"  # bump when what a cached file means changes
COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_commit(name: str, revision: str | None) -> str | None:
    """The commit ``revision`` (default ``main``) of hub repo ``name`` resolves to in the local HF cache
    (``refs/<revision>``, written by every download), a commit hash as given, or None if unknown."""
    if revision and COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}" / "refs" / (revision or "main")
    return ref.read_text().strip() if ref.is_file() else None


def weights_identity(name_or_path: str, revision: str | None) -> str:
    """What identifies the weights behind ``name_or_path`` without reading them: for a local folder
    the weight files' real paths, sizes and modification times; for a hub name, the commit its
    revision resolves to. An unresolved hub revision gets a fresh nonce: it never hits a cache that a
    floating ``main`` may have left stale."""
    folder = Path(name_or_path)
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
        return json.dumps([(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    commit = hub_commit(name_or_path, revision)
    if commit is None:
        log.warning("%s@%s: revision not resolved to a commit; the reference cache will not be reused",
                    name_or_path, revision or "main")
        return f"hub:{name_or_path}@unresolved-{uuid.uuid4().hex}"
    return f"hub:{name_or_path}@{commit}"


def cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:20]


def save_logps(path: Path, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Write ``{chosen, rejected}`` (each ``(N,)`` fp32, by example index) atomically."""
    with atomic_write(path, "wb") as handle:
        torch.save({"chosen": chosen.cpu().float(), "rejected": rejected.cpu().float()}, handle)


def load_logps(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not path.exists():
        return None
    data = torch.load(path, map_location="cpu")
    return data["chosen"], data["rejected"]


class ReferenceCache:
    """Reference log-probs of every train and val pair, computed once and cached under ``cache_dir/<key>``.

    ``spec`` is the model spec, ``datamodule`` the preference data (``fingerprint``: its tokenised
    rows, truncation included; ``precompute_dataloader(split)``), ``average`` whether log-probs are
    per-token means, ``quantization`` the 4-bit settings of a qlora base (None: unquantised; a LoRA
    run's reference is the start model itself and shares the full fine-tuning's cache). The key is
    taken when the cache is filled, after the weights are loaded, so a hub revision resolves to the
    commit that was downloaded."""

    def __init__(self, spec, datamodule, average: bool, cache_dir: str, quantization: dict | None = None) -> None:
        self.spec, self.datamodule, self.average = spec, datamodule, average
        self.cache_dir = Path(cache_dir)
        self.quantization = quantization

    def key(self, precision: str, weights_dtype: torch.dtype) -> str:
        """Everything that changes the cached values: the weights (and ``init_seed`` when they are a
        random init), their dtype as the strategy holds them, the trainer precision, the attention,
        the config overrides, the tokenised data (truncation included), the reduction and the 4-bit
        quantisation when there is one."""
        spec = self.spec
        weights = weights_identity(spec.name_or_path, spec.revision)
        seed = spec.init_seed if spec.random_init else None
        parts = [weights, seed, spec.dtype, str(weights_dtype), precision, spec.attn_implementation,
                 dict(spec.config_overrides or {}), self.datamodule.fingerprint, self.average]
        return cache_key(*parts, *([self.quantization] if self.quantization is not None else []))

    def fill(self, module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{split: (chosen, rejected)}`` for ``train`` and ``val``, from the cache or by one pass of
        ``module.reference``. Rank 0 decides hit or miss and broadcasts the values, so no rank reads a
        file another cannot see, and either every rank runs the pass or none does."""
        trainer = module.trainer
        strategy = trainer.strategy
        key = self.key(str(trainer.precision), next(module.reference_weights().parameters()).dtype)
        out = {}
        for split in ("train", "val"):
            path = self.cache_dir / key / f"{split}.pt"
            cached = load_logps(path) if trainer.is_global_zero else None
            if strategy.broadcast(cached is not None, src=0):
                out[split] = strategy.broadcast(cached, src=0)
                log.info("reference log-probs (%s) from %s", split, path)
                continue
            out[split] = reference_pass(module, self.datamodule.precompute_dataloader(split), split)
            if trainer.is_global_zero:
                save_logps(path, *out[split])
            strategy.barrier()
        return out


@torch.no_grad()
def reference_pass(module, loader, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` reference log-probs ``(N,)`` by example index, ``N = loader.dataset.size``
    (the split's pairs): this rank's equal shard (``loader``) in the training step's precision
    context, gathered from all ranks. Pre-filled with NaN: a row of ``loader.dataset.required`` (all
    ``N`` when absent) left without a value is an error naming it."""
    indices, chosen, rejected = [], [], []
    with module.trainer.precision_plugin.train_step_context():
        for batch in loader:
            batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            size = batch["index"].numel()
            logps = module.reference_logps(batch, split="")  # (2B,)
            indices.append(batch["index"])
            chosen.append(logps[:size].float())
            rejected.append(logps[size:].float())
    index = module.all_gather(torch.cat(indices)).reshape(-1).cpu()
    chosen_all = module.all_gather(torch.cat(chosen)).reshape(-1).cpu()
    rejected_all = module.all_gather(torch.cat(rejected)).reshape(-1).cpu()
    n = loader.dataset.size
    out_chosen, out_rejected = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
    out_chosen[index], out_rejected[index] = chosen_all, rejected_all
    unfilled = out_chosen.isnan() | out_rejected.isnan()  # (N,)
    required = getattr(loader.dataset, "required", None)
    missing = [i for i in (range(n) if required is None else required) if unfilled[i]]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise RuntimeError(f"reference log-probs of split '{split}': {len(missing)} of {n} pairs have no value "
                           f"(rows {shown}): not computed by any rank, or NaN")
    return out_chosen, out_rejected


def release(module) -> None:
    """Free ``module.reference`` (once its log-probs are cached) and collect it. Under DeepSpeed the
    engine and its ZeRO optimizer keep every parameter of the module tree they were built on as a key
    of ``param_names``, which would keep the partitioned reference alive: those entries go first."""
    ids = {id(p) for p in module.reference.parameters()}
    engine = getattr(module.trainer.strategy, "model", None)
    for owner in (engine, getattr(engine, "optimizer", None)):
        names = getattr(owner, "param_names", None)
        if isinstance(names, dict):
            for param in [p for p in names if id(p) in ids]:
                del names[param]
    module.reference = None
    gc.collect()
