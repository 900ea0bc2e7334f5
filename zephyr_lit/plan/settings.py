"""What the run's config sets: world size, precision, strategy (ZeRO stage, offload, buckets),
batch and lengths, sft or dpo, the LM head's chunking and the module's length groups."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from zephyr_lit.errors import UserInputError
from zephyr_lit.plan.adapter import Adapter, adapter_from_config, adapter_problems

GIB = 1024**3
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

#: ``zephyr_lit.logprobs.completion_scores``'s ``chunk_tokens`` default, which the training steps use
#: (a test checks it against the code).
CHUNK_TOKENS = 2048

#: ``lightning.pytorch.strategies.DeepSpeedStrategy`` keyword defaults that matter here, used when
#: the strategy config has no ``config`` dict (a test checks them against the installed Lightning).
LIGHTNING_DEEPSPEED_DEFAULTS = {
    "stage": 2,
    "offload_optimizer": False,
    "offload_parameters": False,
    "overlap_comm": True,
    "allgather_bucket_size": 200_000_000,
    "reduce_bucket_size": 200_000_000,
    "sub_group_size": 1_000_000_000_000,
}

#: DeepSpeed's own defaults (``deepspeed.runtime.zero.config.DeepSpeedZeroConfig``; a test checks them
#: against the installed DeepSpeed): for keys a ``config`` dict leaves out, and for the stage-3 keys
#: Lightning's keyword arguments do not set. ``overlap_comm`` defaults to ``stage == 3``.
DEEPSPEED_DEFAULTS = {
    "allgather_bucket_size": 500_000_000,
    "reduce_bucket_size": 500_000_000,
    "sub_group_size": 1_000_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
}

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
HALF_PRECISIONS = {"bf16-mixed", "16-mixed", "bf16-true", "16-true", "bf16", "16"}
FULL_PRECISIONS = {"32-true", "32"}


@dataclass(frozen=True)
class Setup:
    """Everything besides the model shape that decides the memory of one GPU."""

    module: str = "sft"  # sft | dpo
    world_size: int = 1
    batch_size: int = 1  # rows per GPU (sft) or pairs per GPU (dpo: 2 x batch_size rows)
    eval_batch_size: int = 1
    max_length: int = 512
    model_dtype: str = "float32"
    precision: str = "32-true"
    strategy: str = "single"  # single | ddp | deepspeed
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_parameters: bool = False
    overlap_comm: bool = True
    reduce_bucket_size: int = DEEPSPEED_DEFAULTS["reduce_bucket_size"]
    allgather_bucket_size: int = DEEPSPEED_DEFAULTS["allgather_bucket_size"]
    sub_group_size: int = DEEPSPEED_DEFAULTS["sub_group_size"]
    max_live_parameters: int = DEEPSPEED_DEFAULTS["stage3_max_live_parameters"]
    prefetch_bucket_size: int = DEEPSPEED_DEFAULTS["stage3_prefetch_bucket_size"]
    param_persistence_threshold: int = DEEPSPEED_DEFAULTS["stage3_param_persistence_threshold"]
    gradient_as_bucket_view: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    ref_precompute: bool = False
    packing: bool = False  # sft: examples packed per row (flash attention: one (1, N) row)
    assistant_only_loss: bool = True  # sft: labels on the assistant turns only (false: every token)
    length_groups: int = 1  # module.length_groups as configured (see ``passes``)
    chunk_tokens: int = CHUNK_TOKENS  # LM-head positions per chunk
    gpu_memory_gib: float = 80.0
    context_gib: float = 1.0
    overhead_fraction: float = 0.10
    nodes: int = 1
    devices: int = 1
    adapter: Adapter | None = None  # peft=lora|qlora: only the adapter trains
    paged_optimizer: bool = False  # optim=paged_adamw_32bit: the states can be paged out to CPU memory

    @property
    def master_weights(self) -> bool:
        """DeepSpeed with 16-bit precision: 16-bit weights, fp32 master copy in the optimizer."""
        return self.strategy == "deepspeed" and self.precision in HALF_PRECISIONS

    @property
    def weight_bytes(self) -> int:
        if self.master_weights or self.precision in ("bf16-true", "16-true"):
            return 2
        return DTYPE_BYTES[self.model_dtype]

    @property
    def trained_bytes(self) -> int:
        """The trained weights: the model's (``weight_bytes``), or an adapter's: fp32 (peft keeps adapters in
        fp32 over a 16-bit base), 16-bit under DeepSpeed 16-bit (the engine casts the whole module)."""
        if self.adapter is None:
            return self.weight_bytes
        return 2 if self.master_weights else 4

    @property
    def gradient_bytes(self) -> int:
        """DeepSpeed 16-bit: 2 B; otherwise the trained weights' dtype."""
        return 2 if self.master_weights else self.trained_bytes

    @property
    def autocast(self) -> bool:
        """Lightning's mixed precision outside DeepSpeed: matmuls cast their inputs to 16 bit."""
        return self.strategy != "deepspeed" and self.precision in ("bf16-mixed", "16-mixed", "bf16", "16")

    @property
    def activation_bytes(self) -> int:
        return 2 if self.precision in HALF_PRECISIONS or self.weight_bytes == 2 else 4

    @property
    def rows(self) -> int:
        return self.batch_size * (2 if self.module == "dpo" else 1)

    @property
    def eval_rows(self) -> int:
        return self.eval_batch_size * (2 if self.module == "dpo" else 1)

    @property
    def passes(self) -> int:
        """Forward passes per batch: ``module.length_groups`` at most, always 1 under DeepSpeed."""
        return 1 if self.strategy == "deepspeed" else self.length_groups

    def check(self) -> None:
        problems = [problem for problem in _problems(self) if problem]
        if problems:
            raise UserInputError("; ".join(problems))


def _problems(s: Setup) -> list[str]:
    known = ", ".join(sorted(HALF_PRECISIONS | FULL_PRECISIONS))
    return [
        s.module not in ("sft", "dpo") and f"module {s.module!r}: the planner knows sft and dpo",
        s.world_size < 1 and f"world size {s.world_size}: must be >= 1",
        s.batch_size < 1 and f"data.batch_size={s.batch_size}: must be >= 1",
        s.eval_batch_size < 1 and f"data.eval_batch_size={s.eval_batch_size}: must be >= 1",
        s.max_length < 1 and f"data.max_length={s.max_length}: must be >= 1",
        s.model_dtype not in DTYPE_BYTES and f"model.dtype={s.model_dtype}: one of {', '.join(DTYPE_BYTES)}",
        s.precision not in HALF_PRECISIONS | FULL_PRECISIONS and f"trainer.precision={s.precision}: one of {known}",
        s.strategy == "deepspeed" and s.zero_stage not in (0, 1, 2, 3)
        and f"DeepSpeed stage {s.zero_stage}: one of 0, 1, 2, 3",
        s.length_groups < 1 and f"module.length_groups={s.length_groups}: must be >= 1",
        s.chunk_tokens < 1 and f"chunk_tokens={s.chunk_tokens}: must be >= 1",
        s.gpu_memory_gib <= 0 and f"--gpu-memory-gib {s.gpu_memory_gib}: must be > 0",
        (s.context_gib < 0 or s.overhead_fraction < 0) and "--context-gib and --overhead-fraction must be >= 0",
        *(adapter_problems(s.adapter, s.zero_stage if s.strategy == "deepspeed" else None) if s.adapter else []),
    ]


# ---- from the Hydra config ---------------------------------------------------------------------
def compose_config(overrides: list[str], conf_dir: Path = CONF_DIR):
    """The composed ``conf/config.yaml`` with ``overrides``, as ``train.py`` would see it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from zephyr_lit.config import register_resolvers

    register_resolvers()  # ${asset:...}
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    except Exception as error:  # Hydra / OmegaConf errors: bad override, missing group, ...
        message = str(error).split("Config search path")[0]
        raise UserInputError(f"cannot compose the config with {list(overrides)}: {message}") from None


def world_from_config(cfg, world_size: int | None) -> tuple[int, int, int]:
    """``(world size, nodes, devices per node)``: ``trainer.devices x num_nodes`` unless ``world_size``."""
    devices, nodes = cfg.trainer.devices, cfg.trainer.num_nodes
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    elif not isinstance(devices, int | str):
        devices = len(list(devices))  # a list of device indices
    if isinstance(devices, str) or devices < 1:
        if world_size is None:
            raise UserInputError(f"trainer.devices={devices}: pass --world-size N (GPUs in all)")
        devices = world_size
    nodes = int(nodes or 1)
    return (devices * nodes if world_size is None else world_size), nodes, devices


def strategy_from_config(cfg, world: int) -> dict:
    """The ``Setup`` fields of ``cfg.strategy``: auto / ddp / single device, or DeepSpeed's settings."""
    strategy = cfg.strategy
    if isinstance(strategy, str):
        target, args = "builtins.str", [strategy]
    else:
        target, args = str(strategy.get("_target_", "")), list(strategy.get("_args_") or [])
    name = target.rsplit(".", 1)[-1]
    if name == "str":
        kind = str(args[0]) if args else "auto"
        if kind == "auto":
            return {"strategy": "ddp" if world > 1 else "single"}
        if kind.startswith("ddp"):
            return {"strategy": "ddp"}
        if kind in ("single_device", "dp"):
            return {"strategy": "single"}
        raise UserInputError(f"strategy={kind}: the planner knows auto, ddp and deepspeed")
    if name == "DDPStrategy":
        return {"strategy": "ddp", "gradient_as_bucket_view": bool(strategy.get("gradient_as_bucket_view", False))}
    if name != "DeepSpeedStrategy":
        raise UserInputError(f"strategy._target_={target}: the planner knows auto, DDPStrategy and DeepSpeedStrategy")
    raw = strategy.get("config")
    return _deepspeed_config_dict(raw) if raw is not None else _deepspeed_keywords(strategy)


def _deepspeed_config_dict(raw) -> dict:
    """A DeepSpeed config (dict or JSON file) replaces Lightning's keyword arguments."""
    if isinstance(raw, str):
        try:
            raw = json.loads(Path(raw).read_text())
        except (OSError, ValueError) as error:
            raise UserInputError(f"strategy.config={raw}: {error}") from None
    if not isinstance(raw, dict):
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(raw, resolve=True)
    zero = dict(raw.get("zero_optimization") or {})
    stage = int(zero.get("stage", 0))

    def offloaded(key: str) -> bool:
        return str((zero.get(key) or {}).get("device", "none")) in ("cpu", "nvme")

    defaults = {**DEEPSPEED_DEFAULTS, "overlap_comm": stage == 3}  # DeepSpeed's own defaults
    return _deepspeed_fields(zero, defaults, stage, offloaded("offload_optimizer"), offloaded("offload_param"))


def _deepspeed_keywords(strategy) -> dict:
    """Lightning's keyword arguments; it sets no stage-3 keys, so DeepSpeed's defaults apply to those."""
    zero = {k: strategy[k] for k in strategy if not str(k).startswith("_")}
    stage = int(zero.get("stage", LIGHTNING_DEEPSPEED_DEFAULTS["stage"]))
    defaults = {**DEEPSPEED_DEFAULTS, **LIGHTNING_DEEPSPEED_DEFAULTS}
    offload_optimizer = bool(zero.get("offload_optimizer", False))
    return _deepspeed_fields(zero, defaults, stage, offload_optimizer, bool(zero.get("offload_parameters", False)))


def _deepspeed_fields(
    zero: dict, defaults: dict, stage: int, offload_optimizer: bool, offload_parameters: bool
) -> dict:
    def pick(key: str) -> int:
        return int(float(zero.get(key, defaults[key])))

    return {
        "strategy": "deepspeed",
        "zero_stage": stage,
        "offload_optimizer": offload_optimizer,
        "offload_parameters": offload_parameters,
        "overlap_comm": bool(zero.get("overlap_comm", defaults["overlap_comm"])),
        "reduce_bucket_size": pick("reduce_bucket_size"),
        "allgather_bucket_size": pick("allgather_bucket_size"),
        "sub_group_size": pick("sub_group_size"),
        "max_live_parameters": pick("stage3_max_live_parameters"),
        "prefetch_bucket_size": pick("stage3_prefetch_bucket_size"),
        "param_persistence_threshold": pick("stage3_param_persistence_threshold"),
    }


def setup_from_config(cfg, world_size: int | None = None, **extra) -> Setup:
    """The ``Setup`` a run of ``cfg`` would have (``extra``: gpu_memory_gib, context_gib, ...)."""
    world, nodes, devices = world_from_config(cfg, world_size)
    target = str(cfg.module.get("_target_", ""))
    module = "dpo" if target.endswith("DPOModule") else "sft" if target.endswith("SFTModule") else target
    dpo = cfg.get("dpo") if module == "dpo" else None
    data = cfg.data
    setup = Setup(
        module=module,
        world_size=world,
        nodes=nodes,
        devices=devices,
        batch_size=int(data.batch_size),
        eval_batch_size=int(data.get("eval_batch_size") or data.batch_size),
        max_length=int(data.max_length),
        model_dtype=str(cfg.model.dtype),
        precision=str(cfg.trainer.precision),
        gradient_checkpointing=bool(cfg.model.gradient_checkpointing),
        attn_implementation=str(cfg.model.attn_implementation),
        ref_precompute=bool(dpo.ref.precompute) if dpo is not None else False,
        packing=module == "sft" and bool(data.get("packing", False)),
        assistant_only_loss=module == "dpo" or bool(data.get("assistant_only_loss", True)),
        length_groups=int(cfg.module.get("length_groups", 1) or 1),
        adapter=adapter_from_config(cfg),
        paged_optimizer="Paged" in str(cfg.optim.optimizer.get("_target_", "")),
        **strategy_from_config(cfg, world),
        **extra,
    )
    setup.check()
    return setup
