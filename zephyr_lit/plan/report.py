"""The plan as a table: the rows of ``memory``, the peak phase, the overhead, the total, the text."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from zephyr_lit.plan import adapter_memory, memory
from zephyr_lit.plan.memory import Row
from zephyr_lit.plan.settings import CONF_DIR, GIB, Setup, compose_config, setup_from_config
from zephyr_lit.plan.shape import ModelShape, resolve_shape

PHASES = ("train", "step", "eval", "precompute")
PHASE_NAMES = {
    "train": "training step",
    "step": "optimizer step",
    "eval": "validation",
    "precompute": "reference precompute",
}
ROWS = (
    memory.parameters, memory.gradients, memory.optimizer_states, memory.reference, memory.communication_buffers,
    memory.activations, memory.lm_head, memory.optimizer_step, memory.validation, memory.reference_precompute,
)
ADAPTER_ROWS = (  # peft=lora|qlora: a frozen base, the adapter trains, the reference is the policy itself
    adapter_memory.base_weights, adapter_memory.adapter_weights, memory.gradients, memory.optimizer_states,
    adapter_memory.reference, memory.communication_buffers, memory.activations, memory.lm_head,
    adapter_memory.dequantized_weight, memory.optimizer_step, memory.validation, memory.reference_precompute,
)


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


def plan_memory(shape: ModelShape, setup: Setup) -> Plan:
    """Every row of ``ROWS`` (``ADAPTER_ROWS`` with an adapter); then total = resident + the largest phase
    + overhead, with overhead = context_gib + overhead_fraction x (resident + the largest phase)."""
    setup.check()
    rows = [row for row in (f(shape, setup) for f in (ADAPTER_ROWS if setup.adapter else ROWS)) if row is not None]
    phase_bytes = {p: sum(r.bytes for r in rows if r.phase == p) for p in PHASES}
    peak = max(phase_bytes, key=phase_bytes.get)
    for r in rows:
        r.counted = r.phase in (None, peak)
    subtotal = sum(r.bytes for r in rows if r.counted)
    overhead = setup.context_gib * GIB + setup.overhead_fraction * subtotal
    allowance = f"{setup.context_gib:g} GiB CUDA context/NCCL + {setup.overhead_fraction:.0%} fragmentation"
    rows.append(Row("overhead", overhead, allowance))
    rows.append(Row("total", subtotal + overhead, f"resident + {PHASE_NAMES[peak]} (the largest phase) + overhead"))
    return Plan(shape=shape, setup=setup, rows=rows, peak_phase=peak)


def plan_from_overrides(
    overrides: list[str], world_size: int | None = None, arch: str | None = None, conf_dir: Path = CONF_DIR, **extra
) -> tuple[Plan, str]:
    """Compose, read the setup and the shape (``arch`` first), plan. Returns the plan and the model's name."""
    cfg = compose_config(overrides, conf_dir)
    setup = setup_from_config(cfg, world_size, **extra)
    name = str(cfg.model.name_or_path)
    return plan_memory(resolve_shape(arch or name, conf_dir), setup), name


# ---- text ------------------------------------------------------------------------------------------
def describe_strategy(s: Setup) -> str:
    if s.strategy != "deepspeed":
        return {"ddp": "DDP (nothing partitioned)", "single": "one device (nothing partitioned)"}[s.strategy]
    offload = [k for k, on in (("optimizer", s.offload_optimizer), ("parameters", s.offload_parameters)) if on]
    return f"DeepSpeed ZeRO stage {s.zero_stage}, " + (f"offload {' + '.join(offload)}" if offload else "no offload")


def describe_batch(s: Setup) -> str:
    rows = f"{s.rows} rows" if s.module == "sft" else f"{s.batch_size} pairs = {s.rows} rows"
    eval_rows = f"{s.eval_batch_size} rows" if s.module == "sft" else f"{s.eval_batch_size} pairs"
    layout = ""
    if s.packing:
        flat = s.attn_implementation.startswith("flash_attention")
        layout = ", packed" + (" into one (1, N) row" if flat else "")
    passes = f", up to {s.passes} length-grouped passes" if s.passes > 1 else ""
    return (f"{rows} x {s.max_length} tokens = {s.rows * s.max_length:,} tokens/step{layout}{passes} "
            f"(validation {eval_rows})")


def describe_loss(s: Setup) -> str:
    if s.module == "dpo":
        labels = "the completion tokens"
    elif s.assistant_only_loss:
        labels = "the assistant tokens"
    else:
        labels = "every token but each example's first (assistant_only_loss=false)"
    return f"LM head only at {labels}, {s.chunk_tokens} positions per chunk, fp32 log-softmax per chunk"


def header_lines(plan: Plan, title: str, model_name: str) -> list[str]:
    s, shape = plan.setup, plan.shape
    precision = f"{s.precision}, weights {s.weight_bytes} B, activations {s.activation_bytes} B"
    if s.master_weights:
        precision += ", fp32 master weights"
    module = s.module
    if s.module == "dpo" and s.adapter:
        module += " (reference = the policy with its adapter off" + (", precomputed)" if s.ref_precompute else ")")
    elif s.module == "dpo":
        module += " (policy + frozen reference" + (", precomputed)" if s.ref_precompute else ")")
    if s.nodes * s.devices == s.world_size:
        world = f" ({s.nodes} node{'s' * (s.nodes != 1)} x {s.devices} device{'s' * (s.devices != 1)})"
    else:
        world = " (--world-size)"
    return [
        f"memory plan per GPU{': ' + title if title else ''}",
        f"  model       {model_name or shape.source}: {shape.num_parameters():,} parameters",
        f"  shape       {shape.describe()} (from {shape.source})",
        f"  module      {module}",
        f"  world size  {s.world_size}{world}",
        f"  per GPU     {describe_batch(s)}",
        f"  precision   {precision}",
        f"  strategy    {describe_strategy(s)}",
        f"  layers      gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}, {s.attn_implementation}",
        f"  loss        {describe_loss(s)}",
        *([f"  adapter     {s.adapter.describe(shape)}"] if s.adapter else []),
        "",
    ]


def table_lines(plan: Plan) -> list[str]:
    header = ("item", "phase", "GiB", "how")
    table = []
    for r in plan.rows:
        phase = "" if r.item in ("overhead", "total") else ("resident" if r.phase is None else PHASE_NAMES[r.phase])
        value = f"{r.bytes / GIB:.2f}" if r.counted else f"({r.bytes / GIB:.2f})"
        table.append((r.item, phase, value, r.how))
    w0, w1, w2 = (max(len(x[k]) for x in [header, *table]) for k in range(3))
    lines = []
    for item, phase, value, how in [header, *table]:
        if item == "total":
            lines.append("  " + "-" * (w0 + w1 + w2 + 6))
        lines.append(f"  {item:<{w0}}  {phase:<{w1}}  {value:>{w2}}  {how}".rstrip())
    lines.append("  (values in parentheses: phases smaller than the peak, not added)")
    return lines


def verdict(plan: Plan) -> str:
    capacity, total = plan.setup.gpu_memory_gib, plan.total_bytes / GIB
    if plan.fits:
        return f"fits in {capacity:g} GiB: yes ({capacity - total:.1f} GiB free)"
    return f"fits in {capacity:g} GiB: no, does NOT fit ({total - capacity:.1f} GiB over)"


def render(plan: Plan, title: str = "", model_name: str = "") -> str:
    """The header (what was read), the table and the verdict."""
    return "\n".join([*header_lines(plan, title, model_name), *table_lines(plan), verdict(plan)])
