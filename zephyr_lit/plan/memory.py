"""One function per row of the plan, its formula in its docstring (bytes per GPU).

N = parameters, W = world size, w = weight bytes, g = gradient bytes, a = activation bytes,
h = hidden, i = MLP width, V = vocabulary, L = layers, T = tokens of the batch, s = max_length.
Everything is an estimate of what is allocated, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

from zephyr_lit.plan.adapter import lora_layer_bytes_per_token, lora_parameters
from zephyr_lit.plan.settings import Setup
from zephyr_lit.plan.shape import ModelShape


@dataclass
class Row:
    item: str
    bytes: float
    how: str
    phase: str | None = None  # None: resident all run long; else one of report.PHASES
    counted: bool = True  # False: a phase that is not the peak (shown, not added)


def short_count(count: float) -> str:
    """7241732096 -> '7.24B', 266240 -> '266K'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return f"{count:.0f}"


def trained_parameters(shape: ModelShape, setup: Setup) -> int:
    """N, or with an adapter its parameters only (``adapter.lora_parameters``): the base is frozen."""
    return lora_parameters(shape, setup.adapter) if setup.adapter else shape.num_parameters()


# ---- resident -----------------------------------------------------------------------------------
def weights_on_gpu(shape: ModelShape, setup: Setup, what: str) -> tuple[float, str]:
    """One model's weights: N x w; ZeRO-3: (N - P) x w / W + P x w with P the small parameters kept
    whole (<= stage3_param_persistence_threshold elements); offloaded: P x w."""
    n, w, world = shape.num_parameters(), setup.weight_bytes, setup.world_size
    if not (setup.strategy == "deepspeed" and setup.zero_stage == 3):
        return n * w, f"{short_count(n)} x {w} B ({what}, whole on every GPU)"
    persistent = shape.persistent_parameters(setup.param_persistence_threshold)
    on_gpu = 0 if setup.offload_parameters else (n - persistent) * w / world
    how = f"{short_count(n - persistent)} x {w} B / {world}"
    if setup.offload_parameters:
        how = "partition offloaded to CPU"
    if persistent:
        threshold = short_count(setup.param_persistence_threshold)
        how += f" + {short_count(persistent)} small params whole (<= {threshold} elements)"
    return on_gpu + persistent * w, how


def parameters(shape: ModelShape, setup: Setup) -> Row:
    """The trained model's weights (``weights_on_gpu``): 16-bit under DeepSpeed 16-bit or ``*-true``."""
    return Row("parameters", *weights_on_gpu(shape, setup, {2: "16-bit", 4: "fp32"}[setup.weight_bytes]))


def gradients(shape: ModelShape, setup: Setup) -> Row:
    """N x g, divided by W from ZeRO stage 2 on (with an adapter N counts its parameters only)."""
    n, g, world = trained_parameters(shape, setup), setup.gradient_bytes, setup.world_size
    if setup.strategy == "deepspeed" and setup.zero_stage >= 2:
        return Row("gradients", n * g / world, f"{short_count(n)} x {g} B / {world}")
    return Row("gradients", n * g, f"{short_count(n)} x {g} B")


def optimizer_states(shape: ModelShape, setup: Setup) -> Row:
    """DeepSpeed 16-bit: N x 12 (fp32 master + AdamW m, v); else N x 2w (m, v in the trained weights' dtype;
    an adapter's: fp32); divided by W from ZeRO stage 1 on; 0 when offloaded. Adapter: N = its parameters."""
    n, world = trained_parameters(shape, setup), setup.world_size
    per = 12 if setup.master_weights else 2 * setup.trained_bytes
    what = "fp32 master + AdamW m, v" if setup.master_weights else f"AdamW m, v in {'16-bit' if per == 4 else 'fp32'}"
    paged = "; paged: out to CPU memory when the GPU runs short" if setup.paged_optimizer else ""
    base = f"{short_count(n)} x {per} B ({what}{paged})"
    if setup.strategy == "deepspeed" and setup.offload_optimizer:
        return Row("optimizer states", 0, base + " offloaded to CPU")
    if setup.strategy == "deepspeed" and setup.zero_stage >= 1:
        return Row("optimizer states", n * per / world, f"{base} / {world}")
    return Row("optimizer states", n * per, base)


def reference(shape: ModelShape, setup: Setup) -> Row:
    """DPO's frozen reference: its weights only (``weights_on_gpu``, partitioned like the policy);
    0 for SFT and with ``dpo.ref.precompute`` (freed after the precompute pass)."""
    if setup.module != "dpo":
        return Row("reference", 0, "none (sft)")
    if setup.ref_precompute:
        return Row("reference", 0, "freed after the precompute pass (dpo.ref.precompute)")
    bytes_, how = weights_on_gpu(shape, setup, "frozen, weights only")
    return Row("reference", bytes_, how + ", no grads or optimizer state")


def communication_buffers(shape: ModelShape, setup: Setup) -> Row:
    """ZeRO-3: min(live models x (N - P), max(stage3_max_live_parameters, largest module)) x w gathered
    + reduce_bucket_size x g. ZeRO-1/2: (allgather x w + reduce x g) buckets, x 4.5 with overlap_comm.
    DDP: N_trained x g (its buckets) unless gradient_as_bucket_view. Otherwise 0. An adapter's reference
    is the policy itself: one live model."""
    n, w, g = shape.num_parameters(), setup.weight_bytes, setup.gradient_bytes
    deepspeed = setup.strategy == "deepspeed"
    if deepspeed and setup.zero_stage == 3:
        persistent = shape.persistent_parameters(setup.param_persistence_threshold)
        models = 2 if setup.module == "dpo" and not setup.ref_precompute and setup.adapter is None else 1
        gathered = min((n - persistent) * models, max(setup.max_live_parameters, shape.largest_module()))
        return Row("ZeRO buffers", gathered * w + setup.reduce_bucket_size * g,
                   f"gathered params <= {short_count(gathered)} x {w} B (stage3_max_live_parameters) + reduce bucket "
                   f"{short_count(setup.reduce_bucket_size)} x {g} B")
    if deepspeed and setup.zero_stage in (1, 2):
        factor = 4.5 if setup.overlap_comm else 1.0
        buckets = setup.allgather_bucket_size * w + setup.reduce_bucket_size * g
        allgather, reduce = short_count(setup.allgather_bucket_size), short_count(setup.reduce_bucket_size)
        how = f"{factor:g} x (allgather {allgather} x {w} B + reduce {reduce} x {g} B)"
        return Row("ZeRO buffers", factor * buckets, how)
    if setup.strategy == "ddp" and not setup.gradient_as_bucket_view:
        trained = trained_parameters(shape, setup)
        how = f"{short_count(trained)} x {g} B (a copy of the gradients; gradient_as_bucket_view=false)"
        return Row("DDP buckets", trained * g, how)
    return Row("ZeRO buffers", 0, "none (stage 0)" if deepspeed else "none (no DeepSpeed)")


# ---- the training step ----------------------------------------------------------------------------
def layer_bytes_per_token(shape: ModelShape, setup: Setup, seq: int) -> float:
    """What autograd saves per token in one decoder layer: two RMSNorms 2 (4h + 2ah); attention, flash /
    flex a (2 q + 2 kv) + 4 heads (q, k, v, out; fp32 logsumexp), sdpa / eager 5 a q + 4 heads (k, v
    repeated to all heads, output made contiguous), eager + heads x seq x (4 + a) (fp32 softmax and
    its cast; 4 when a = 4); SwiGLU 4 a i (gate, up, silu(gate), their product)."""
    a, h, i, q, kv = setup.activation_bytes, shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    norms = 2 * (4 * h + 2 * a * h)
    if setup.attn_implementation in ("flash_attention_2", "flex_attention"):
        attention = a * (2 * q + 2 * kv) + 4 * shape.heads
    else:
        attention = a * 5 * q + 4 * shape.heads
        if setup.attn_implementation == "eager":
            attention += shape.heads * seq * (4 + (a if a != 4 else 0))
    return norms + attention + 4 * a * i


def adapter_layer_bytes(shape: ModelShape, setup: Setup) -> int:
    """With an adapter ``adapter.lora_layer_bytes_per_token`` for the run's dtypes, else 0: s = a under
    autocast or DeepSpeed 16-bit, else the adapter's fp32; the adapter's input is a copy when dropout > 0
    or when the adapter's dtype differs from the activations' (peft casts the input to it)."""
    if setup.adapter is None:
        return 0
    a = setup.activation_bytes
    saved = a if setup.autocast or setup.master_weights else setup.trained_bytes
    copies = setup.adapter.dropout > 0 or setup.trained_bytes != a
    return lora_layer_bytes_per_token(shape, setup.adapter, a, saved, copies)


def activations(shape: ModelShape, setup: Setup) -> Row:
    """T = rows x s tokens (padded rows, packed rows or a flash (1, N) row alike), c = per-layer bytes
    (``layer_bytes_per_token`` + ``adapter_layer_bytes``):
    checkpointed L x T x h x a (layer inputs) + T x c (one layer recomputed), else L x T x c;
    + T x a (3i + 2h) (the backward's working gradients) + T (4h + 2ah) (final norm)
    + rows x s x s mask for sdpa (1 B) / eager (a B)."""
    a, h, i, s, rows = setup.activation_bytes, shape.hidden, shape.intermediate, setup.max_length, setup.rows
    tokens, per_layer = rows * s, layer_bytes_per_token(shape, setup, s) + adapter_layer_bytes(shape, setup)
    working, final_norm = tokens * a * (3 * i + 2 * h), tokens * (4 * h + 2 * a * h)
    mask = 0
    if setup.attn_implementation in ("sdpa", "eager"):
        mask = rows * s * s * (a if setup.attn_implementation == "eager" else 1)
    if setup.gradient_checkpointing:
        stored = shape.layers * tokens * h * a + tokens * per_layer
        how = (f"checkpointed: {shape.layers} layer inputs x {tokens:,} tok x {h} x {a} B + 1 layer recomputed "
               f"({per_layer / 1024:.0f} KiB/tok) + backward grads")
    else:
        stored = shape.layers * tokens * per_layer
        how = f"{shape.layers} layers x {tokens:,} tok x {per_layer / 1024:.0f} KiB/tok + backward grads"
    if mask:
        how += f" + {rows}x{s}x{s} mask"
    if setup.adapter is not None:
        how += f" (LoRA: {adapter_layer_bytes(shape, setup) / 1024:+.0f} KiB/tok per layer)"
    return Row("activations", stored + working + final_norm + mask, how, phase="train")


def labelled_positions(rows: int, max_length: int) -> int:
    """Positions the LM head runs at, at most rows x (max_length - 1): a row's first token is never a
    label. SFT labels every token but each example's first with assistant_only_loss=false (packed rows:
    max_length - examples per row; a flash (1, N) row: N - examples), the assistant tokens otherwise;
    DPO the completion only (max_length - its prompt, and a prompt holds at least BOS). The bound is
    what a batch of full rows reaches; length-grouped passes hold no more positions."""
    return rows * max(max_length - 1, 0)


def chunk_sizes(labelled: int, chunk_tokens: int) -> list[int]:
    """``completion_scores``' chunks: n = chunk_tokens positions each, the last one the rest."""
    return [min(chunk_tokens, labelled - start) for start in range(0, labelled, chunk_tokens)]


def lm_head_training_bytes(
    labelled: int, vocab: int, hidden: int, activation_bytes: int, chunk_tokens: int, gradient_bytes: int
) -> int:
    """``completion_scores`` forward + backward of one pass at N labelled positions, chunks n_k:

        max_k  V x 4 x (n_0 + ... + n_k)   fp32 logits of the chunks not yet through backward (kept by
                                           ``logsumexp``; ``gather`` keeps its index only; backward runs
                                           the last chunk first)
             + V x 12 x n_k                chunk k's backward: z - logsumexp, its exp, times the gradient (fp32)
        + N x h x 2a                       labelled hidden states (kept by the head's matmul) and their gradient
        + V x h x g                        the head's weight gradient, whole until ZeRO reduces it

    A chunk's forward (a-byte head output + fp32 copy, then logsumexp's fp32 workspace) peaks lower."""
    sizes = chunk_sizes(labelled, chunk_tokens)
    logits = max((vocab * 4 * sum(sizes[: k + 1]) + vocab * 12 * n for k, n in enumerate(sizes)), default=0)
    return logits + labelled * hidden * 2 * activation_bytes + vocab * hidden * gradient_bytes * bool(labelled)


def lm_head_no_grad_bytes(labelled: int, vocab: int, hidden: int, activation_bytes: int, chunk_tokens: int) -> int:
    """``completion_scores`` without gradients at N labelled positions, chunks n_k, a' = a + 4 (a < 4: the
    head output and its fp32 copy) or 4 (a = 4: no copy):

        max_k max(V x (4 n_(k-1) + a' n_k),   the previous chunk's fp32 logits (still bound) + this chunk's
                  V x 8 n_k)                  fp32 logits + logsumexp's fp32 workspace
        + N x h x a                           labelled hidden states"""
    sizes = chunk_sizes(labelled, chunk_tokens)
    fresh = activation_bytes + 4 if activation_bytes < 4 else 4
    logits = max((vocab * max(4 * (sizes[k - 1] if k else 0) + fresh * n, 8 * n) for k, n in enumerate(sizes)),
                 default=0)
    return logits + labelled * hidden * activation_bytes


def lm_head(shape: ModelShape, setup: Setup) -> Row:
    """The policy's ``lm_head_training_bytes`` at ``labelled_positions(rows, s)``; with an adapter the head is
    frozen (no weight gradient). DPO's reference head (no grad) runs before the backward and peaks lower;
    RPO's NLL reuses the same log-probs."""
    a, vocab, chunk_tokens = setup.activation_bytes, shape.vocab, setup.chunk_tokens
    labelled = labelled_positions(setup.rows, setup.max_length)
    chunk = min(chunk_tokens, labelled)
    head_grad = 0 if setup.adapter else setup.gradient_bytes
    total = lm_head_training_bytes(labelled, vocab, shape.hidden, a, chunk_tokens, head_grad)
    what = "completion" if setup.module == "dpo" else "labelled"
    passes = f" in up to {setup.passes} passes" if setup.passes > 1 else ""
    how = (f"{labelled:,} {what} pos{passes}: fp32 logits kept <= {labelled:,} x {vocab} x 4 B + 1 chunk's backward "
           f"<= {chunk:,} x {vocab} x 12 B + labelled hidden{' and head' * (not setup.adapter)} grads")
    return Row("LM head", total, how, phase="train")


# ---- the other phases ------------------------------------------------------------------------------
def optimizer_step(shape: ModelShape, setup: Setup) -> Row:
    """DeepSpeed 16-bit: min(N / W (ZeRO >= 1) or N, sub_group_size) x 8 (fp32 gradients of one
    sub-group + AdamW's fp32 scratch); 0 when the optimizer is offloaded; plain AdamW: N x w (a scratch).
    With an adapter N and w are its own."""
    n, w, world = trained_parameters(shape, setup), setup.trained_bytes, setup.world_size
    deepspeed = setup.strategy == "deepspeed"
    if deepspeed and setup.offload_optimizer:
        return Row("optimizer step", 0, "on CPU (offload_optimizer)", phase="step")
    if setup.master_weights:
        per = min(n / world if setup.zero_stage >= 1 else n, setup.sub_group_size)
        return Row("optimizer step", per * 8, f"{short_count(per)} x 8 B (fp32 grads of one sub-group of the "
                   "partition + AdamW sqrt scratch)", phase="step")
    return Row("optimizer step", n * w, f"{short_count(n)} x {w} B (AdamW sqrt scratch)", phase="step")


def no_grad_pass_bytes(shape: ModelShape, setup: Setup) -> tuple[float, int, int]:
    """One no-grad pass over eval rows x s = T tokens: T x (a (3i + 3h) + 4h) (one layer's forward
    working set) + ``lm_head_no_grad_bytes`` at ``labelled_positions(eval rows, s)``.
    Returns (bytes, T, labelled positions)."""
    a, h, i, s = setup.activation_bytes, shape.hidden, shape.intermediate, setup.max_length
    tokens, labelled = setup.eval_rows * s, labelled_positions(setup.eval_rows, s)
    layer = tokens * (a * (3 * i + 3 * h) + 4 * h)
    return layer + lm_head_no_grad_bytes(labelled, shape.vocab, h, a, setup.chunk_tokens), tokens, labelled


def validation(shape: ModelShape, setup: Setup) -> Row:
    """``no_grad_pass_bytes``: DPO's policy and reference run one after the other, one head at a time."""
    bytes_, tokens, labelled = no_grad_pass_bytes(shape, setup)
    chunk = min(setup.chunk_tokens, labelled)
    return Row("validation", bytes_, f"no grad, {setup.eval_rows} rows x {setup.max_length} = {tokens:,} tok: 1 layer"
               f" + LM head, chunks of {chunk:,} x {shape.vocab} (of {labelled:,} pos)", phase="eval")


def reference_precompute(shape: ModelShape, setup: Setup) -> Row | None:
    """DPO with ``dpo.ref.precompute``: the reference's weights (``weights_on_gpu``; none with an adapter: the
    policy with its adapter off) + ``no_grad_pass_bytes``; None otherwise."""
    if setup.module != "dpo" or not setup.ref_precompute:
        return None
    weights = 0 if setup.adapter else weights_on_gpu(shape, setup, "reference")[0]
    pass_bytes, tokens, _ = no_grad_pass_bytes(shape, setup)
    return Row("ref precompute", weights + pass_bytes, f"reference weights ({weights / 1024**3:.2f} GiB) + no-grad "
               f"pass over {tokens:,} tok (1 layer + LM head)", phase="precompute")
