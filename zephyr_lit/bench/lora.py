"""The LoRA case (``dpo-lora``): the same adapter on both sides, from the same start values.

Both trainers adapt the same seven linear layers of every decoder layer with the workload's rank,
alpha and dropout (ours through ``peft=lora``, TRL through ``peft_config``), and then overwrite the
adapter's fresh values with ``lora_init(w)``: one seeded draw for both, so that ours and TRL train the
very same network and their per-step losses must agree like the other equal-settings cases. B starts
non-zero (unlike peft's B = 0) so that the policy differs from the reference at the first step already.
"""

from __future__ import annotations

import math
import re

from zephyr_lit.bench.workload import Workload

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # = all-linear
#: ``...layers.<i>.<self_attn|mlp>.<proj>.lora_<A|B>...`` in any wrapper's parameter names
LORA_NAME = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.")
B_SCALE = 0.1  # B ~ 0.1 x U(-1/sqrt(r), 1/sqrt(r)): the adapter moves each weight by ~7% of its init scale


def ours_overrides(w: Workload) -> list[str]:
    """Hydra overrides that give our side the workload's adapter, its lr used as it is (no lr_scale)."""
    return ["peft=lora", f"peft.r={w.lora_r}", f"peft.alpha={w.lora_alpha}", f"peft.dropout={w.lora_dropout}",
            f"peft.target_modules=[{','.join(TARGETS)}]", "peft.lr_scale=1.0"]


def trl_peft_config(w: Workload):
    """The same adapter for TRL's ``DPOTrainer(peft_config=...)``."""
    from peft import LoraConfig

    return LoraConfig(r=w.lora_r, lora_alpha=w.lora_alpha, lora_dropout=w.lora_dropout, target_modules=list(TARGETS),
                      task_type="CAUSAL_LM")


def linear_shapes(w: Workload) -> dict[str, tuple[int, int]]:
    """``(d_in, d_out)`` of each adapted linear of the workload's Mistral, keyed ``<self_attn|mlp>.<proj>``."""
    h, i = w.hidden, w.intermediate
    q, kv = w.heads * (h // w.heads), w.kv_heads * (h // w.heads)
    return {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}


def lora_init(w: Workload) -> dict[str, object]:
    """``layers.<i>.<module>.lora_A`` (r, d_in) ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (peft's Kaiming-uniform
    bound) and ``lora_B`` (d_out, r) ~ B_SCALE x U(-1/sqrt(r), 1/sqrt(r)), fp32, from one generator
    seeded with the workload's seed, in a fixed order."""
    import torch

    generator = torch.Generator().manual_seed(w.seed)

    def uniform(rows: int, cols: int, bound: float):
        return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound

    values = {}
    for layer in range(w.layers):
        for module, (d_in, d_out) in linear_shapes(w).items():
            key = f"layers.{layer}.{module}"
            values[f"{key}.lora_A"] = uniform(w.lora_r, d_in, 1 / math.sqrt(d_in))
            values[f"{key}.lora_B"] = uniform(d_out, w.lora_r, B_SCALE / math.sqrt(w.lora_r))
    return values


def load_lora_init(model, w: Workload) -> int:
    """Copy ``lora_init(w)`` into ``model``'s adapter parameters (matched by ``LORA_NAME``, whatever
    wraps them); every value must land exactly once. Returns the number of tensors set."""
    import torch

    values, seen = lora_init(w), set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            match = LORA_NAME.search(name)
            if match:
                layer, block, proj, which = match.groups()
                key = f"layers.{layer}.{block}.{proj}.lora_{which}"
                if key in seen or key not in values or param.shape != values[key].shape:
                    raise ValueError(f"adapter parameter {name} {tuple(param.shape)} does not match the bench's "
                                     f"LoRA init (r={w.lora_r}, targets {', '.join(TARGETS)})")
                param.copy_(values[key])
                seen.add(key)
    if seen != values.keys():
        raise ValueError(f"{len(values) - len(seen)} of the {len(values)} LoRA init tensors found no adapter "
                         "parameter: the model's adapter is not the workload's")
    return len(seen)
