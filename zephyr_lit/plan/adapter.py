"""Adapters in the plan (``peft=lora|qlora``): what trains, and what a 4-bit base weighs.

LoRA adds to each targeted linear layer ``W (d_out x d_in)`` two trainable matrices ``A (r x d_in)`` and
``B (d_out x r)``: r (d_in + d_out) parameters. Every base weight stays frozen. QLoRA also stores the
frozen decoder linears in 4-bit NF4 (bitsandbytes): 0.5 B per weight plus the quantisation constants of
each block of 64 weights; embeddings, the LM head and the norms stay in ``model.dtype``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # shape.py reads settings.py, which reads this module
    from zephyr_lit.plan.shape import ModelShape

#: bitsandbytes' 4-bit block: one absmax constant per 64 weights (``quantize_4bit``'s blocksize default).
NF4_BLOCK = 64
#: With double quantisation the fp32 absmax constants are themselves quantised to 8 bits in blocks of 256.
DOUBLE_QUANT_BLOCK = 256


@dataclass(frozen=True)
class Adapter:
    """``peft.*`` as the plan needs it. ``targets``: module names (``q_proj``, ...); None: every linear layer
    of the decoder, i.e. peft's ``all-linear`` (the LM head is never adapted)."""

    method: str = "lora"  # lora | qlora
    r: int = 16
    targets: tuple[str, ...] | None = None
    dropout: float = 0.05
    double_quant: bool = True  # qlora: quantise the quantisation constants too

    @property
    def quantized(self) -> bool:
        return self.method == "qlora"

    def adapts(self, name: str) -> bool:
        return self.targets is None or name in self.targets

    def describe(self, shape: ModelShape) -> str:
        names = [name for name, _, _ in shape.linears() if self.adapts(name)]
        trained = lora_parameters(shape, self)
        share = trained / shape.num_parameters()
        text = (f"LoRA r={self.r} on {', '.join(names)} x {shape.layers} layers: {trained:,} trainable "
                f"({share:.2%}), dropout {self.dropout:g}")
        if self.quantized:
            text += f"; base linears in NF4{' + double quant' if self.double_quant else ''}"
        return text


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapter_problems(adapter: Adapter, zero_stage: int | None) -> list[str]:
    """What the plan refuses: an unknown method, a rank < 1, targets that are not decoder linears, QLoRA
    under ZeRO-3."""
    out = []
    if adapter.method not in ("lora", "qlora"):
        out.append(f"peft.method={adapter.method}: the planner knows none, lora and qlora")
    if adapter.r < 1:
        out.append(f"peft.r={adapter.r}: must be >= 1")
    unknown = sorted(set(adapter.targets or ()) - set(LINEAR_NAMES))
    if unknown:
        out.append(f"peft.target_modules: {', '.join(unknown)} not among the decoder's linear layers "
                   f"({', '.join(LINEAR_NAMES)}); the planner adapts those only")
    if adapter.quantized and zero_stage == 3:
        out.append("peft=qlora with DeepSpeed ZeRO-3: a 4-bit base cannot be built inside deepspeed.zero.Init")
    return out


def adapter_from_config(cfg) -> Adapter | None:
    """``cfg.peft`` (``conf/peft/``) as an ``Adapter``; None for ``peft=none`` or a config without it."""
    peft = cfg.get("peft")
    method = str(peft.get("method", "none")) if peft is not None else "none"
    if method == "none":
        return None
    targets = peft.get("target_modules", "all-linear")
    targets = [targets] if isinstance(targets, str) else list(targets)
    return Adapter(
        method=method,
        r=int(peft.r),
        targets=None if targets == ["all-linear"] else tuple(str(t) for t in targets),
        dropout=float(peft.get("dropout", 0.0)),
        double_quant=bool(peft.get("double_quant", True)),
    )


# ---- counts -------------------------------------------------------------------------------------
def lora_tensor_sizes(shape: ModelShape, adapter: Adapter) -> list[int]:
    """Elements of every adapter tensor, A (r x d_in) then B (d_out x r) per targeted linear and layer."""
    per_layer = [size for name, d_in, d_out in shape.linears() if adapter.adapts(name)
                 for size in (adapter.r * d_in, d_out * adapter.r)]
    return per_layer * shape.layers


def lora_parameters(shape: ModelShape, adapter: Adapter) -> int:
    """The trainable parameters: layers x sum over targeted linears of r (d_in + d_out)."""
    return sum(lora_tensor_sizes(shape, adapter))


def quantized_sizes(shape: ModelShape) -> list[int]:
    """Elements of every weight QLoRA stores in 4 bits: the decoder's linear weights (biases, norms,
    embeddings and the LM head stay unquantised)."""
    return [d_in * d_out for _, d_in, d_out in shape.linears()] * shape.layers


def nf4_bytes(elements: int, double_quant: bool, block: int = NF4_BLOCK) -> float:
    """One weight in NF4: n / 2 B of packed 4-bit codes + its absmax constants, one per block of 64:
    fp32 without double quantisation (4 B / 64 = 0.5 bit per weight), else 1 B each plus one fp32 scale
    per 256 of them and one fp32 offset (~0.127 bit per weight; QLoRA paper, section 3).
    bitsandbytes also keeps a 16-entry code table per tensor (64 B), left out."""
    blocks = math.ceil(elements / block)
    constants = blocks * 4 if not double_quant else blocks + math.ceil(blocks / DOUBLE_QUANT_BLOCK) * 4 + 4
    return math.ceil(elements / 2) + constants


#: The inputs that full fine-tuning keeps for the linears' weight gradients, by the linears that share them
#: (``o_proj``'s input, the attention output, is kept by the attention's own backward either way).
SHARED_INPUTS = {"q_proj": "attention in", "k_proj": "attention in", "v_proj": "attention in",
                 "gate_proj": "mlp in", "up_proj": "mlp in", "down_proj": "down in"}


def lora_layer_bytes_per_token(
    shape: ModelShape, adapter: Adapter, activation_bytes: int, saved_bytes: int, copies: bool, mask_bytes: int = 1
) -> int:
    """What LoRA changes in what autograd saves per token and decoder layer (add it to
    ``memory.layer_bytes_per_token``, which counts full fine-tuning). a = activation bytes; s = the bytes of
    the adapter's input as ``lora_A`` keeps it and of A's output (``saved_bytes``: a under autocast or
    DeepSpeed, else the adapter's own fp32, 4); m = a dropout mask's bytes (CUDA: bool, 1; CPU: 4):

        - 2 a h                           frozen norm weights: their normalised input is not kept
        + sum over targets  s r           A's output, kept by B
        - a d_g for each shared input g   (attention in: h, mlp in: h, down in: i) the frozen base no longer
                                          keeps, unless a target keeps that same tensor (no copy)
        + sum over targets  (s + m) d_in  with ``copies`` (dropout > 0, or a cast to the adapter's dtype):
                                          each target's own dropped / cast input, and its mask if dropout

    Checked against a real LoRA layer on CPU (``tests/test_plan.py``)."""
    a, h, i = activation_bytes, shape.hidden, shape.intermediate
    targets = [(name, d_in) for name, d_in, _ in shape.linears() if adapter.adapts(name)]
    width = {"attention in": h, "mlp in": h, "down in": i}
    kept = set() if copies else {SHARED_INPUTS[name] for name, _ in targets if name in SHARED_INPUTS}
    delta = -2 * a * h + len(targets) * saved_bytes * adapter.r - a * sum(width[g] for g in width if g not in kept)
    if copies:
        mask = mask_bytes if adapter.dropout > 0 else 0
        delta += sum((saved_bytes + mask) * d_in for _, d_in in targets)
    return delta
