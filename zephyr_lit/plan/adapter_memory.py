"""The rows that differ when an adapter trains (``peft=lora|qlora``), one function per row, formula in
its docstring (bytes per GPU). They replace ``memory.parameters`` and ``memory.reference``; the other rows
of ``memory`` count the adapter's parameters as the trained ones (``memory.trained_parameters``).

A = adapter parameters (``adapter.lora_parameters``), Q = elements of the 4-bit weights, N = all of the
base's parameters, w = the base's weight bytes, w_A = the adapter's (``Setup.trained_bytes``), W = world size.
"""

from __future__ import annotations

from zephyr_lit.plan.adapter import lora_tensor_sizes, nf4_bytes, quantized_sizes
from zephyr_lit.plan.memory import Row, short_count, weights_on_gpu
from zephyr_lit.plan.settings import Setup
from zephyr_lit.plan.shape import ModelShape


def base_weights(shape: ModelShape, setup: Setup) -> Row:
    """The frozen base. LoRA: ``weights_on_gpu`` (N x w, partitioned under ZeRO-3). QLoRA: each 4-bit
    weight's ``adapter.nf4_bytes`` (~0.516 B per weight with double quantisation, 0.5625 B without)
    + (N - Q) x w for what stays unquantised (embeddings, LM head, norms), whole on every GPU."""
    if not setup.adapter.quantized:
        bytes_, how = weights_on_gpu(shape, setup, "frozen")
        return Row("base weights", bytes_, how)
    sizes = quantized_sizes(shape)
    quantized, double_quant = sum(sizes), setup.adapter.double_quant
    four_bit = sum(nf4_bytes(n, double_quant) for n in sizes)
    rest = shape.num_parameters() - quantized
    how = (f"{short_count(quantized)} linear weights in NF4 ({four_bit / quantized:.4f} B each: 4-bit codes + "
           f"{'double-quantised ' if double_quant else 'fp32 '}block constants) + {short_count(rest)} x "
           f"{setup.weight_bytes} B (embeddings, LM head, norms)")
    return Row("base weights", four_bit + rest * setup.weight_bytes, how)


def adapter_weights(shape: ModelShape, setup: Setup) -> Row:
    """A x w_A; under ZeRO-3 (A - P) x w_A / W + P x w_A, P the adapter tensors of at most
    stage3_param_persistence_threshold elements (kept whole), like the base's (``memory.weights_on_gpu``)."""
    sizes, w = lora_tensor_sizes(shape, setup.adapter), setup.trained_bytes
    total = sum(sizes)
    if not (setup.strategy == "deepspeed" and setup.zero_stage == 3):
        return Row("adapter", total * w, f"{short_count(total)} x {w} B (trainable, whole on every GPU)")
    persistent = sum(n for n in sizes if n <= setup.param_persistence_threshold)
    on_gpu = 0 if setup.offload_parameters else (total - persistent) * w / setup.world_size
    how = f"{short_count(total - persistent)} x {w} B / {setup.world_size} + {short_count(persistent)} small whole"
    return Row("adapter", on_gpu + persistent * w, how)


def reference(shape: ModelShape, setup: Setup) -> Row:
    """0: DPO's reference is the policy with its adapter switched off (no second model)."""
    if setup.module != "dpo":
        return Row("reference", 0, "none (sft)")
    return Row("reference", 0, "the policy with its adapter switched off: no second model")


def dequantized_weight(shape: ModelShape, setup: Setup) -> Row | None:
    """QLoRA: the largest 4-bit weight dequantised for its matmul, max d_in x d_out x a (one at a time, in
    the forward and again in the backward); None without a 4-bit base."""
    if not setup.adapter.quantized:
        return None
    n = max(d_in * d_out for _, d_in, d_out in shape.linears())
    a = setup.activation_bytes
    return Row("4-bit dequant", n * a, f"largest linear {short_count(n)} x {a} B, one at a time", phase="train")
