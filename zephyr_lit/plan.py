"""Per-GPU memory plan of a run, from the same Hydra config that ``train.py`` would use.

    python -m zephyr_lit.plan +experiment=zephyr-7b-beta-dsft
    python -m zephyr_lit.plan +experiment=zephyr-7b-beta-ddpo --gpu-memory-gib 80
    python -m zephyr_lit.plan +experiment=zephyr-7b-beta-dsft data.batch_size=16 --world-size 32

It prints, per GPU, the bytes of the parameters, gradients, optimizer states, the frozen DPO
reference, the activations and logits of one training step at the configured batch and length,
the ZeRO / DDP communication buffers, an overhead allowance, the total, and whether that fits.

What is read from the config: ``model`` (shape, dtype, gradient checkpointing, attention),
``trainer`` (devices x num_nodes, precision), ``strategy`` (DeepSpeed stage and offload flags, or
DDP / single device), ``data`` (batch_size, eval_batch_size, max_length), ``module`` (sft or dpo)
and ``dpo`` (``ref.precompute``, ``rpo_alpha``).

The model shape comes from, in order: ``--arch``; a local folder with ``config.json`` (read with
``transformers.AutoConfig``); the built-in table ``KNOWN_SHAPES`` (no hub access needed); an export
that a previous stage will write (``<root>/<experiment>/latest/model``: the shape of that
experiment's model); the local Hugging Face cache. Only Mistral / Llama-style decoders are supported.

Memory model (bytes; N = parameters of the model, W = world size, T = tokens per GPU per step,
h = hidden, i = MLP width, V = vocabulary, L = layers, a = activation bytes, w = weight bytes).
Everything is an estimate of what is allocated, not a measurement:

* weights, gradients, optimizer: DeepSpeed with 16-bit precision keeps 16-bit weights (w = 2) and
  gradients (2 B) and, in the optimizer, fp32 master weights + AdamW m and v (12 B). Otherwise the
  weights are in the model dtype (``*-true`` 16-bit precisions convert them), gradients in the same
  dtype and ``torch.optim.AdamW`` keeps m and v in the parameter dtype (2 w). ZeRO partitions across
  W ranks: stage 1 the optimizer states, stage 2 also the gradients, stage 3 also the weights. Under
  stage 3, parameters of at most ``stage3_param_persistence_threshold`` elements (the norms) stay
  whole on every rank. Offloaded states count 0 on the GPU.
* reference (DPO): its weights only (no gradients, no optimizer state), partitioned like the policy
  under ZeRO-3 (it is built in the same ``configure_model``). With ``dpo.ref.precompute`` it exists
  only during the precompute pass, before training, and is freed.
* activations of a training step. Per token and layer, what autograd saves (see
  ``layer_bytes_per_token``): two RMSNorms (fp32 input copy + two a-byte tensors each), the
  attention inputs/outputs (flash / flex: q, k, v, out with GQA-sized k and v; sdpa and eager get
  k and v repeated to all heads by transformers when there is a mask, plus a contiguous copy of
  the output; eager adds the softmax, fp32 and cast to a bytes, ``heads x s`` per token), SwiGLU's
  four i-wide tensors. With gradient checkpointing (transformers checkpoints every decoder layer):
  L layer inputs (``L x T x h x a``) + one layer recomputed + the backward's working gradients
  (``T x a x (3 i + 2 h)``). Without: L full layers + the same working gradients. Plus the final
  norm, and the ``rows x s x s`` mask for sdpa (bool) / eager (a bytes).
* logits: SFT's cross-entropy makes an fp32 copy and a saved fp32 log-softmax; at its backward the
  saved log-softmax, its gradient and the input gradient coexist: ``T x V x 12``. DPO
  (``zephyr_lit.logprobs.token_logprobs``): the a-byte policy logits + fp32 rows saved by
  ``logsumexp`` + the reference's logits in its forward (or the logits' gradient in the backward):
  ``T x V x (4 + 2 a)``, plus two fp32 rows of scratch. ``dpo.rpo_alpha`` adds SFT's
  ``12 B x V`` on the chosen half.
* optimizer step: DeepSpeed makes an fp32 copy of the gradients of one sub-group of the partition
  (``min(N / W, sub_group_size)`` elements) and AdamW (foreach) one fp32 scratch of it (8 B per
  element); plain AdamW one scratch in the parameter dtype (``N x w``).
* validation (no gradients, ``eval_batch_size``): one layer's forward working set
  (``T x (a (3 i + 3 h) + 4 h)``) + logits (SFT: a-byte logits, fp32 copy and log-softmax; DPO:
  policy and reference logits + fp32 row scratch).
* ZeRO buffers, stage 3: gathered parameters, at most ``stage3_max_live_parameters`` (DeepSpeed
  releases beyond it; the largest module is always gathered whole; the prefetch bucket,
  ``stage3_prefetch_bucket_size``, is assumed to lie within that cap) + one reduce bucket
  (``reduce_bucket_size`` elements, gradient dtype). Stages 1-2: the allgather and reduce buckets, x 4.5 with
  ``overlap_comm`` (DeepSpeed's documented cost). DDP: a second copy of the gradients in its
  buckets unless ``gradient_as_bucket_view``. The DeepSpeed settings come from the strategy's
  ``config`` dict when it has one (DeepSpeed's defaults, ``DEEPSPEED_DEFAULTS``, for missing keys),
  else from its keyword arguments (Lightning's defaults, ``LIGHTNING_DEEPSPEED_DEFAULTS``, and
  DeepSpeed's for the stage-3 keys Lightning does not set).
* the peak: everything resident + the largest phase (training step: activations + logits;
  optimizer step; validation; reference precompute), then the overhead: a fixed CUDA context /
  NCCL / cuBLAS allowance (default 1 GiB) + a fraction (default 10%) for allocator fragmentation.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from zephyr_lit.errors import UserInputError

GIB = 1024**3
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

#: Architecture of models whose ``config.json`` may not be available offline.
KNOWN_SHAPES: dict[str, dict] = {
    "mistralai/Mistral-7B-v0.1": {
        "model_type": "mistral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
}

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
PHASES = ("train", "step", "eval", "precompute")
PHASE_NAMES = {
    "train": "training step",
    "step": "optimizer step",
    "eval": "validation",
    "precompute": "reference precompute",
}


# ---- model shape and exact parameter count ------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """A Mistral / Llama-style decoder: embedding, L x (RMSNorm, q/k/v/o attention with GQA,
    RMSNorm, SwiGLU gate/up/down), final RMSNorm, LM head (untied unless ``tied``)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False
    attention_bias: bool = False  # Llama's ``attention_bias``: q, k, v and o get biases
    mlp_bias: bool = False  # Llama's ``mlp_bias``
    source: str = ""

    @classmethod
    def from_config(cls, config, source: str = "") -> ModelShape:
        """From a transformers config (or a dict with the same keys)."""
        get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
        model_type = get("model_type")
        if model_type not in ("mistral", "llama"):
            raise UserInputError(
                f"model_type={model_type!r} ({source or 'model'}): "
                "the planner knows Mistral / Llama-style decoders only"
            )
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        llama = model_type == "llama"
        return cls(
            vocab=int(get("vocab_size")),
            hidden=hidden,
            intermediate=int(get("intermediate_size")),
            layers=int(get("num_hidden_layers")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            tied=bool(get("tie_word_embeddings", False)),
            attention_bias=llama and bool(get("attention_bias", False)),
            mlp_bias=llama and bool(get("mlp_bias", False)),
            source=source,
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def modules(self) -> list[tuple[str, list[int]]]:
        """Every module with parameters and the element counts of its tensors, in model order."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim

        def linear(n_in: int, n_out: int, bias: bool) -> list[int]:
            return [n_in * n_out] + ([n_out] if bias else [])

        out = [("embed_tokens", [self.vocab * h])]
        for layer in range(self.layers):
            p = f"layers.{layer}."
            out += [
                (p + "input_layernorm", [h]),
                (p + "q_proj", linear(h, q, self.attention_bias)),
                (p + "k_proj", linear(h, kv, self.attention_bias)),
                (p + "v_proj", linear(h, kv, self.attention_bias)),
                (p + "o_proj", linear(q, h, self.attention_bias)),
                (p + "post_attention_layernorm", [h]),
                (p + "gate_proj", linear(h, i, self.mlp_bias)),
                (p + "up_proj", linear(h, i, self.mlp_bias)),
                (p + "down_proj", linear(i, h, self.mlp_bias)),
            ]
        out.append(("norm", [h]))
        if not self.tied:
            out.append(("lm_head", [self.vocab * h]))
        return out

    def num_parameters(self) -> int:
        """Exact: equals ``sum(p.numel() for p in model.parameters())`` of the built model."""
        return sum(sum(sizes) for _, sizes in self.modules())

    def persistent_parameters(self, threshold: int) -> int:
        """Elements in tensors of at most ``threshold`` elements (kept whole under ZeRO-3)."""
        return sum(n for _, sizes in self.modules() for n in sizes if n <= threshold)

    def largest_module(self) -> int:
        return max(sum(sizes) for _, sizes in self.modules())

    def describe(self) -> str:
        return (
            f"{self.layers} layers, hidden {self.hidden}, MLP {self.intermediate}, {self.heads} heads / "
            f"{self.kv_heads} KV heads x {self.head_dim}, vocab {self.vocab}, "
            f"{'tied' if self.tied else 'untied'} embeddings"
        )


def _shape_from_folder(folder: Path) -> ModelShape:
    from transformers import AutoConfig

    return ModelShape.from_config(AutoConfig.from_pretrained(str(folder)), source=f"{folder}/config.json")


def _shape_from_table(name: str) -> ModelShape:
    return ModelShape.from_config(KNOWN_SHAPES[name], source=f"built-in table for {name}")


def _export_experiment(name_or_path: str, conf_dir: Path) -> str | None:
    """``<root>/<experiment>/latest/model`` -> ``<experiment>`` when conf/experiment has it."""
    parts = Path(name_or_path).parts
    if len(parts) >= 3 and parts[-2:] == ("latest", "model"):
        if (conf_dir / "experiment" / f"{parts[-3]}.yaml").is_file():
            return parts[-3]
    return None


def resolve_shape(name_or_path: str, conf_dir: Path = CONF_DIR, _seen: tuple[str, ...] = ()) -> ModelShape:
    """The shape of ``name_or_path``; see the module docstring for the order of the sources."""
    folder = Path(name_or_path).expanduser()
    if (folder / "config.json").is_file():
        return _shape_from_folder(folder)
    if name_or_path in KNOWN_SHAPES:
        return _shape_from_table(name_or_path)
    experiment = _export_experiment(name_or_path, conf_dir)
    if experiment and experiment not in _seen:
        parent = compose_config([f"+experiment={experiment}"], conf_dir).model.name_or_path
        shape = resolve_shape(str(parent), conf_dir, _seen + (experiment,))
        source = f"{name_or_path} not written yet: the export of +experiment={experiment} -> {shape.source}"
        return replace(shape, source=source)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError):
        raise UserInputError(
            f"no config.json for model {name_or_path!r} (not a local folder, not in the Hugging Face cache, not in "
            f"the planner's table {sorted(KNOWN_SHAPES)}): pass --arch with a known name or a folder with config.json"
        ) from None
    return ModelShape.from_config(config, source=f"{name_or_path} (Hugging Face cache)")


# ---- the run's settings ---------------------------------------------------------------------------
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
    rpo: bool = False
    gpu_memory_gib: float = 80.0
    context_gib: float = 1.0
    overhead_fraction: float = 0.10
    nodes: int = 1
    devices: int = 1

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
    def activation_bytes(self) -> int:
        return 2 if self.precision in HALF_PRECISIONS or self.weight_bytes == 2 else 4

    @property
    def rows(self) -> int:
        return self.batch_size * (2 if self.module == "dpo" else 1)

    @property
    def eval_rows(self) -> int:
        return self.eval_batch_size * (2 if self.module == "dpo" else 1)

    def check(self) -> None:
        problems = []
        if self.module not in ("sft", "dpo"):
            problems.append(f"module {self.module!r}: the planner knows sft and dpo")
        if self.world_size < 1:
            problems.append(f"world size {self.world_size}: must be >= 1")
        if self.batch_size < 1:
            problems.append(f"data.batch_size={self.batch_size}: must be >= 1")
        if self.eval_batch_size < 1:
            problems.append(f"data.eval_batch_size={self.eval_batch_size}: must be >= 1")
        if self.max_length < 1:
            problems.append(f"data.max_length={self.max_length}: must be >= 1")
        if self.model_dtype not in DTYPE_BYTES:
            problems.append(f"model.dtype={self.model_dtype}: one of {', '.join(DTYPE_BYTES)}")
        if self.precision not in HALF_PRECISIONS | FULL_PRECISIONS:
            known = ", ".join(sorted(HALF_PRECISIONS | FULL_PRECISIONS))
            problems.append(f"trainer.precision={self.precision}: one of {known}")
        if self.strategy == "deepspeed" and self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"DeepSpeed stage {self.zero_stage}: one of 0, 1, 2, 3")
        if self.gpu_memory_gib <= 0:
            problems.append(f"--gpu-memory-gib {self.gpu_memory_gib}: must be > 0")
        if self.context_gib < 0 or self.overhead_fraction < 0:
            problems.append("--context-gib and --overhead-fraction must be >= 0")
        if problems:
            raise UserInputError("; ".join(problems))


# ---- the plan ---------------------------------------------------------------------------------------
@dataclass
class Row:
    item: str
    bytes: float
    how: str
    phase: str | None = None  # None: resident all run long; else one of PHASES
    counted: bool = True  # False: a phase that is not the peak (shown, not added)


@dataclass
class Plan:
    shape: ModelShape
    setup: Setup
    rows: list[Row] = field(default_factory=list)
    peak_phase: str = "train"

    def row(self, item: str) -> Row:
        return next(r for r in self.rows if r.item == item)

    @property
    def total_bytes(self) -> float:
        return self.row("total").bytes

    @property
    def capacity_bytes(self) -> float:
        return self.setup.gpu_memory_gib * GIB

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes


def _n(count: float) -> str:
    """7241732096 -> '7.24B', 266240 -> '266K'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return f"{count:.0f}"


def layer_bytes_per_token(shape: ModelShape, setup: Setup, seq: int) -> float:
    """Bytes autograd saves per token in one decoder layer (see the module docstring)."""
    a, h, i, q, kv = setup.activation_bytes, shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    norms = 2 * (4 * h + 2 * a * h)
    if setup.attn_implementation in ("flash_attention_2", "flex_attention"):
        attention = a * (2 * q + 2 * kv) + 4 * shape.heads  # q, k, v, out; fp32 logsumexp
    else:  # sdpa, eager: k and v repeated to all heads, output made contiguous
        attention = a * 5 * q + 4 * shape.heads
        if setup.attn_implementation == "eager":
            attention += shape.heads * seq * (4 + (a if a != 4 else 0))  # fp32 softmax + its a-byte cast
    mlp = 4 * a * i  # gate, up, silu(gate), silu(gate) * up
    return norms + attention + mlp


def _activations(shape: ModelShape, setup: Setup, rows: int) -> tuple[float, str]:
    a, h, i, s = setup.activation_bytes, shape.hidden, shape.intermediate, setup.max_length
    tokens = rows * s
    per_layer = layer_bytes_per_token(shape, setup, s)
    working = tokens * a * (3 * i + 2 * h)
    final_norm = tokens * (4 * h + 2 * a * h)
    mask = 0
    if setup.attn_implementation in ("sdpa", "eager"):
        mask = rows * s * s * (a if setup.attn_implementation == "eager" else 1)
    if setup.gradient_checkpointing:
        stored = shape.layers * tokens * h * a + tokens * per_layer
        how = (
            f"checkpointed: {shape.layers} layer inputs x {tokens:,} tok x {h} x {a} B + 1 layer recomputed "
            f"({per_layer / 1024:.0f} KiB/tok) + backward grads"
        )
    else:
        stored = shape.layers * tokens * per_layer
        how = f"{shape.layers} layers x {tokens:,} tok x {per_layer / 1024:.0f} KiB/tok + backward grads"
    if mask:
        how += f" + {rows}x{s}x{s} mask"
    return stored + working + final_norm + mask, how


def _logits(shape: ModelShape, setup: Setup) -> tuple[float, str]:
    a, vocab, s = setup.activation_bytes, shape.vocab, setup.max_length
    tokens = setup.rows * s
    if setup.module == "sft":
        return tokens * vocab * 12, f"{tokens:,} tok x {vocab} x 12 B (fp32 log-softmax, its grad, input grad)"
    total = tokens * vocab * (4 + 2 * a) + 8 * s * vocab
    how = f"{tokens:,} tok x {vocab} x {4 + 2 * a} B ({a} B policy logits, fp32 logsumexp rows, ref logits or grad)"
    if setup.rpo:
        chosen = setup.batch_size * s
        total += chosen * vocab * 12
        how += f" + rpo NLL {chosen:,} tok x 12 B"
    return total, how


def _validation(shape: ModelShape, setup: Setup) -> tuple[float, str]:
    a, h, i, s, vocab = setup.activation_bytes, shape.hidden, shape.intermediate, setup.max_length, shape.vocab
    tokens = setup.eval_rows * s
    layer = tokens * (a * (3 * i + 3 * h) + 4 * h)
    if setup.module == "sft":
        logits = tokens * vocab * (a + 8)
        what = f"{a} B logits + fp32 copy + log-softmax"
    else:
        models = 1 if setup.ref_precompute else 2
        logits = tokens * vocab * a * models + 8 * s * vocab
        what = f"{a} B logits of {'policy' if models == 1 else 'policy and reference'} + fp32 rows"
    return layer + logits, f"no grad, {setup.eval_rows} rows x {s} = {tokens:,} tok: 1 layer + {what}"


def plan_memory(shape: ModelShape, setup: Setup) -> Plan:
    """The rows of the plan (bytes per GPU); see the module docstring for every formula."""
    setup.check()
    n, world = shape.num_parameters(), setup.world_size
    w, a = setup.weight_bytes, setup.activation_bytes
    g = 2 if setup.master_weights else w
    ds, stage = setup.strategy == "deepspeed", setup.zero_stage if setup.strategy == "deepspeed" else 0
    split_params, split_grads, split_optim = (ds and stage >= k for k in (3, 2, 1))
    dtype_name = {2: "16-bit", 4: "fp32"}
    rows: list[Row] = []

    # parameters (and the reference: the same tensors, frozen)
    persistent = shape.persistent_parameters(setup.param_persistence_threshold) if split_params else 0

    def weights(what: str) -> tuple[float, str]:
        if not split_params:
            return n * w, f"{_n(n)} x {w} B ({what}, whole on every GPU)"
        on_gpu = 0 if setup.offload_parameters else (n - persistent) * w / world
        how = "partition offloaded to CPU" if setup.offload_parameters else f"{_n(n - persistent)} x {w} B / {world}"
        if persistent:
            how += f" + {_n(persistent)} small params whole (<= {_n(setup.param_persistence_threshold)} elements)"
        return on_gpu + persistent * w, how

    rows.append(Row("parameters", *weights(f"{dtype_name[w]}")))
    if split_grads:
        rows.append(Row("gradients", n * g / world, f"{_n(n)} x {g} B / {world}"))
    else:
        rows.append(Row("gradients", n * g, f"{_n(n)} x {g} B"))
    optim_bytes = 12 if setup.master_weights else 2 * w
    optim_what = "fp32 master + AdamW m, v" if setup.master_weights else f"AdamW m, v in {dtype_name[w]}"
    if ds and setup.offload_optimizer:
        rows.append(Row("optimizer states", 0, f"{_n(n)} x {optim_bytes} B ({optim_what}) offloaded to CPU"))
    elif split_optim:
        rows.append(Row(
            "optimizer states", n * optim_bytes / world, f"{_n(n)} x {optim_bytes} B ({optim_what}) / {world}"
        ))
    else:
        rows.append(Row("optimizer states", n * optim_bytes, f"{_n(n)} x {optim_bytes} B ({optim_what})"))

    ref_bytes, ref_how = weights("frozen, weights only")
    if setup.module != "dpo":
        rows.append(Row("reference", 0, "none (sft)"))
    elif setup.ref_precompute:
        rows.append(Row("reference", 0, "freed after the precompute pass (dpo.ref.precompute)"))
    else:
        rows.append(Row("reference", ref_bytes, ref_how + ", no grads or optimizer state"))

    # communication buffers
    if ds and stage == 3:
        live_models = 2 if setup.module == "dpo" and not setup.ref_precompute else 1
        gathered = min((n - persistent) * live_models, max(setup.max_live_parameters, shape.largest_module()))
        rows.append(Row(
            "ZeRO buffers",
            gathered * w + setup.reduce_bucket_size * g,
            f"gathered params <= {_n(gathered)} x {w} B (stage3_max_live_parameters) + reduce bucket "
            f"{_n(setup.reduce_bucket_size)} x {g} B",
        ))
    elif ds and stage in (1, 2):
        factor = 4.5 if setup.overlap_comm else 1.0
        buckets = setup.allgather_bucket_size * w + setup.reduce_bucket_size * g
        rows.append(Row(
            "ZeRO buffers",
            factor * buckets,
            f"{factor:g} x (allgather {_n(setup.allgather_bucket_size)} x {w} B"
            f" + reduce {_n(setup.reduce_bucket_size)} x {g} B)",
        ))
    elif setup.strategy == "ddp" and not setup.gradient_as_bucket_view:
        rows.append(Row(
            "DDP buckets", n * g, f"{_n(n)} x {g} B (a copy of the gradients; gradient_as_bucket_view=false)"
        ))
    else:
        rows.append(Row("ZeRO buffers", 0, "none (no DeepSpeed)" if not ds else "none (stage 0)"))

    # phases
    rows.append(Row("activations", *_activations(shape, setup, setup.rows), phase="train"))
    rows.append(Row("logits", *_logits(shape, setup), phase="train"))
    if ds and setup.offload_optimizer:
        rows.append(Row("optimizer step", 0, "on CPU (offload_optimizer)", phase="step"))
    elif setup.master_weights:
        per = min(n / world if split_optim else n, setup.sub_group_size)
        rows.append(Row(
            "optimizer step", per * 8,
            f"{_n(per)} x 8 B (fp32 grads of one sub-group of the partition + AdamW sqrt scratch)", phase="step",
        ))
    else:
        rows.append(Row("optimizer step", n * w, f"{_n(n)} x {w} B (AdamW sqrt scratch)", phase="step"))
    rows.append(Row("validation", *_validation(shape, setup), phase="eval"))
    if setup.module == "dpo" and setup.ref_precompute:
        s = setup.max_length
        tokens = setup.eval_rows * s
        working = tokens * (a * (3 * shape.intermediate + 3 * shape.hidden) + 4 * shape.hidden)
        logits = tokens * shape.vocab * a + 8 * s * shape.vocab
        rows.append(Row(
            "ref precompute",
            ref_bytes + working + logits,
            f"reference weights ({ref_bytes / GIB:.2f} GiB) + no-grad pass over {tokens:,} tok"
            f" (1 layer + {a} B logits)",
            phase="precompute",
        ))

    phase_bytes = {p: sum(r.bytes for r in rows if r.phase == p) for p in PHASES}
    peak = max(phase_bytes, key=phase_bytes.get)
    for r in rows:
        r.counted = r.phase in (None, peak)
    subtotal = sum(r.bytes for r in rows if r.counted)
    overhead = setup.context_gib * GIB + setup.overhead_fraction * subtotal
    rows.append(Row(
        "overhead", overhead,
        f"{setup.context_gib:g} GiB CUDA context/NCCL + {setup.overhead_fraction:.0%} fragmentation",
    ))
    rows.append(Row("total", subtotal + overhead, f"resident + {PHASE_NAMES[peak]} (the largest phase) + overhead"))
    return Plan(shape=shape, setup=setup, rows=rows, peak_phase=peak)


# ---- text ------------------------------------------------------------------------------------------------
def render(plan: Plan, title: str = "", model_name: str = "") -> str:
    s, shape = plan.setup, plan.shape
    if s.strategy == "deepspeed":
        offload = [k for k, on in (("optimizer", s.offload_optimizer), ("parameters", s.offload_parameters)) if on]
        strategy = f"DeepSpeed ZeRO stage {s.zero_stage}, " + (
            f"offload {' + '.join(offload)}" if offload else "no offload"
        )
    else:
        strategy = {"ddp": "DDP (nothing partitioned)", "single": "one device (nothing partitioned)"}[s.strategy]
    precision = f"{s.precision}, weights {s.weight_bytes} B, activations {s.activation_bytes} B"
    if s.master_weights:
        precision += ", fp32 master weights"
    rows_per = f"{s.rows} rows" if s.module == "sft" else f"{s.batch_size} pairs = {s.rows} rows"
    eval_rows = f"{s.eval_batch_size} rows" if s.module == "sft" else f"{s.eval_batch_size} pairs"
    module = s.module
    if s.module == "dpo":
        module += " (policy + frozen reference" + (", precomputed)" if s.ref_precompute else ")")
    if s.nodes * s.devices == s.world_size:
        world = f" ({s.nodes} node{'s' * (s.nodes != 1)} x {s.devices} device{'s' * (s.devices != 1)})"
    else:
        world = " (--world-size)"
    tokens = f"{s.rows * s.max_length:,} tokens/step"
    lines = [
        f"memory plan per GPU{': ' + title if title else ''}",
        f"  model       {model_name or shape.source}: {shape.num_parameters():,} parameters",
        f"  shape       {shape.describe()} (from {shape.source})",
        f"  module      {module}",
        f"  world size  {s.world_size}{world}",
        f"  per GPU     {rows_per} x {s.max_length} tokens = {tokens} (validation {eval_rows})",
        f"  precision   {precision}",
        f"  strategy    {strategy}",
        f"  layers      gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}, {s.attn_implementation}",
        "",
    ]
    header = ("item", "phase", "GiB", "how")
    table = []
    for r in plan.rows:
        phase = "" if r.item in ("overhead", "total") else ("resident" if r.phase is None else PHASE_NAMES[r.phase])
        value = f"{r.bytes / GIB:.2f}" if r.counted else f"({r.bytes / GIB:.2f})"
        table.append((r.item, phase, value, r.how))
    w0 = max(len(x[0]) for x in [header, *table])
    w1 = max(len(x[1]) for x in [header, *table])
    w2 = max(len(x[2]) for x in [header, *table])
    for i, (item, phase, value, how) in enumerate([header, *table]):
        if item == "total":
            lines.append("  " + "-" * (w0 + w1 + w2 + 6))
        lines.append(f"  {item:<{w0}}  {phase:<{w1}}  {value:>{w2}}  {how}".rstrip())
    lines.append("  (values in parentheses: phases smaller than the peak, not added)")
    capacity = s.gpu_memory_gib
    total = plan.total_bytes / GIB
    if plan.fits:
        lines.append(f"fits in {capacity:g} GiB: yes ({capacity - total:.1f} GiB free)")
    else:
        lines.append(f"fits in {capacity:g} GiB: no, does NOT fit ({total - capacity:.1f} GiB over)")
    return "\n".join(lines)


# ---- from the Hydra config -------------------------------------------------------------------------------
def compose_config(overrides: list[str], conf_dir: Path = CONF_DIR):
    """The composed ``conf/config.yaml`` with ``overrides``, as ``train.py`` would see it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from zephyr_lit.config import register_resolvers

    register_resolvers()  # ${asset:...}

    was_initialized = GlobalHydra.instance().is_initialized()
    if was_initialized:
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    except Exception as error:  # Hydra / OmegaConf errors: bad override, missing group, ...
        message = str(error).split("Config search path")[0]
        raise UserInputError(f"cannot compose the config with {list(overrides)}: {message}") from None


def _world(cfg, world_size: int | None) -> tuple[int, int, int]:
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


def _strategy(cfg, world: int) -> dict:
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
    if raw is not None:  # a DeepSpeed config (dict or JSON file) replaces Lightning's keyword arguments
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
        defaults = {**DEEPSPEED_DEFAULTS, "overlap_comm": stage == 3}  # DeepSpeed's own defaults

        def offloaded(key: str) -> bool:
            return str((zero.get(key) or {}).get("device", "none")) in ("cpu", "nvme")

        offload_optimizer, offload_parameters = offloaded("offload_optimizer"), offloaded("offload_param")
    else:  # Lightning's keyword arguments; it sets no stage-3 keys, so DeepSpeed's defaults apply to those
        zero = {k: strategy[k] for k in strategy if not str(k).startswith("_")}
        stage = int(zero.get("stage", LIGHTNING_DEEPSPEED_DEFAULTS["stage"]))
        defaults = {**DEEPSPEED_DEFAULTS, **LIGHTNING_DEEPSPEED_DEFAULTS}
        offload_optimizer = bool(zero.get("offload_optimizer", False))
        offload_parameters = bool(zero.get("offload_parameters", False))

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
    world, nodes, devices = _world(cfg, world_size)
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
        rpo=bool(dpo.get("rpo_alpha")) if dpo is not None else False,
        **_strategy(cfg, world),
        **extra,
    )
    setup.check()
    return setup


def plan_from_overrides(
    overrides: list[str], world_size: int | None = None, arch: str | None = None, conf_dir: Path = CONF_DIR, **extra
) -> tuple[Plan, str]:
    """Compose, read the setup and the shape, plan. Returns the plan and the model's name."""
    cfg = compose_config(overrides, conf_dir)
    setup = setup_from_config(cfg, world_size, **extra)
    name = str(cfg.model.name_or_path)
    shape = resolve_shape(arch, conf_dir) if arch else resolve_shape(name, conf_dir)
    return plan_memory(shape, setup), name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zephyr_lit.plan",
        description="Per-GPU memory plan of a run: the same Hydra overrides as train.py.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +experiment=zephyr-7b-beta-dsft")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80: A100-80GB)")
    parser.add_argument(
        "--world-size", type=int, default=None, help="GPUs in all (default trainer.devices x trainer.num_nodes)"
    )
    parser.add_argument(
        "--arch", default=None, help="model shape: a name in the built-in table or a folder with config.json"
    )
    parser.add_argument(
        "--context-gib", type=float, default=1.0, help="fixed CUDA context / NCCL allowance (default 1)"
    )
    parser.add_argument("--overhead-fraction", type=float, default=0.10, help="fragmentation allowance (default 0.10)")
    args = parser.parse_args(argv)
    try:
        plan, name = plan_from_overrides(
            args.overrides,
            world_size=args.world_size,
            arch=args.arch,
            gpu_memory_gib=args.gpu_memory_gib,
            context_gib=args.context_gib,
            overhead_fraction=args.overhead_fraction,
        )
    except UserInputError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    title = " ".join(args.overrides) or "default config"
    print(render(plan, title=title, model_name=name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
