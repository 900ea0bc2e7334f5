"""Per-GPU memory plan of a run, from the same Hydra config that ``train.py`` would use.

    python -m zephyr_lit.plan +experiment=zephyr-7b-beta-dsft
    python -m zephyr_lit.plan +experiment=zephyr-7b-beta-ddpo --gpu-memory-gib 80
    python -m zephyr_lit.plan +experiment=zephyr-7b-beta-dsft data.batch_size=16 --world-size 32

Per GPU: parameters, gradients, optimizer states, the frozen DPO reference, the ZeRO / DDP buffers
(resident); the activations and the LM head of one training step, the optimizer step, validation
and the reference precompute (phases: only the largest one counts); an overhead allowance; the
total, and whether it fits. With ``peft=lora|qlora`` the base is frozen (in 4-bit NF4 for qlora),
only the adapter has gradients and optimizer states, and the DPO reference is the policy itself.

``shape`` reads the model's shape, ``settings`` what the config sets, ``memory`` has one function
per row with its formula, ``adapter`` counts an adapter and a 4-bit base, ``adapter_memory`` has the
rows that differ with one, ``report`` assembles and prints the table, ``__main__`` is the CLI.
"""

from __future__ import annotations

from zephyr_lit.plan.adapter import Adapter, lora_parameters, nf4_bytes
from zephyr_lit.plan.memory import (
    Row,
    labelled_positions,
    layer_bytes_per_token,
    lm_head_no_grad_bytes,
    lm_head_training_bytes,
)
from zephyr_lit.plan.report import PHASE_NAMES, PHASES, Plan, plan_from_overrides, plan_memory, render
from zephyr_lit.plan.settings import (
    CHUNK_TOKENS,
    CONF_DIR,
    DEEPSPEED_DEFAULTS,
    GIB,
    LIGHTNING_DEEPSPEED_DEFAULTS,
    Setup,
    compose_config,
    setup_from_config,
)
from zephyr_lit.plan.shape import KNOWN_SHAPES, ModelShape, resolve_shape

__all__ = [
    "CHUNK_TOKENS", "CONF_DIR", "DEEPSPEED_DEFAULTS", "GIB", "KNOWN_SHAPES", "LIGHTNING_DEEPSPEED_DEFAULTS",
    "PHASES", "PHASE_NAMES", "Adapter", "ModelShape", "Plan", "Row", "Setup", "compose_config", "labelled_positions",
    "layer_bytes_per_token", "lm_head_no_grad_bytes", "lm_head_training_bytes", "lora_parameters", "main",
    "nf4_bytes", "plan_from_overrides", "plan_memory", "render", "resolve_shape", "setup_from_config",
]


def __getattr__(name: str):
    """``main`` lives in ``__main__`` (imported on first use, so ``python -m zephyr_lit.plan`` does not
    import that module twice)."""
    if name == "main":
        from zephyr_lit.plan.__main__ import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
