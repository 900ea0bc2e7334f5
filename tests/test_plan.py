"""The memory planner: exact parameter counts, hand-computed bytes, config reading and the CLI."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from zephyr_lit.assets import asset_path
from zephyr_lit.errors import UserInputError
from zephyr_lit.logprobs import completion_scores
from zephyr_lit.plan import (
    CHUNK_TOKENS,
    DEEPSPEED_DEFAULTS,
    GIB,
    KNOWN_SHAPES,
    LIGHTNING_DEEPSPEED_DEFAULTS,
    ModelShape,
    Setup,
    compose_config,
    labelled_positions,
    layer_bytes_per_token,
    lm_head_no_grad_bytes,
    lm_head_training_bytes,
    main,
    plan_memory,
    setup_from_config,
)
from zephyr_lit.plan.adapter import Adapter, lora_layer_bytes_per_token, lora_parameters, nf4_bytes
from zephyr_lit.plan.memory import adapter_layer_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]

SMALL_CONFIGS = [
    MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),                      # GQA
    MistralConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=6, tie_word_embeddings=True),  # MHA, tied
    MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=16),          # head_dim != h / heads
    LlamaConfig(vocab_size=70, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
]


# ---- parameter count ------------------------------------------------------------------------------
@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=["gqa", "mha-tied", "head-dim", "llama-bias"])
def test_count_matches_a_real_model(config):
    model = (LlamaForCausalLM if config.model_type == "llama" else MistralForCausalLM)(config)
    shape = ModelShape.from_config(config)
    params = list(model.parameters())  # shared (tied) tensors appear once
    assert shape.num_parameters() == sum(p.numel() for p in params)
    assert shape.persistent_parameters(100) == sum(p.numel() for p in params if p.numel() <= 100)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert shape.largest_module() == largest


def test_mistral_7b_from_the_table():
    plan = main_plan("+experiment=zephyr-7b-beta-dsft")
    assert plan.shape.num_parameters() == 7_241_732_096
    assert "built-in table" in plan.shape.source


def test_tiny_default_is_read_from_its_config_json():
    config = MistralConfig.from_pretrained(asset_path("tiny-mistral"))
    plan = main_plan()
    assert plan.shape == ModelShape.from_config(config, source=plan.shape.source)
    assert plan.shape.source.endswith("config.json")


# ---- hand-computed bytes ------------------------------------------------------------------------------
# vocab 64, hidden 16, MLP 32, 2 layers, 4 heads x 4, 2 KV heads x 4:
#   embedding 64*16 = 1024; per layer q 16*16 = 256, k 16*8 = 128, v 128, o 256, gate/up/down 3*512,
#   2 norms 32 -> 2336; 2 layers 4672; final norm 16; LM head 1024 -> N = 6736.
TINY = ModelShape(vocab=64, hidden=16, intermediate=32, layers=2, heads=4, kv_heads=2, head_dim=4)
N = 6736


def ds3(**kw) -> Setup:
    base = dict(
        module="dpo", batch_size=2, eval_batch_size=1, max_length=8, model_dtype="bfloat16", precision="bf16-mixed",
        strategy="deepspeed", zero_stage=3, param_persistence_threshold=0, gradient_checkpointing=True,
        attn_implementation="flash_attention_2", reduce_bucket_size=100, max_live_parameters=1000,
        context_gib=0.0, overhead_fraction=0.0,
    )
    return Setup(**{**base, **kw})


def test_tiny_count_by_hand():
    assert TINY.num_parameters() == N
    assert TINY.largest_module() == 1024  # embedding / LM head


@pytest.mark.parametrize("world", [2, 4])
def test_zero3_partitions_weights_gradients_and_optimizer(world):
    plan = plan_memory(TINY, ds3(world_size=world))
    assert plan.row("parameters").bytes == N * 2 / world
    assert plan.row("gradients").bytes == N * 2 / world
    assert plan.row("optimizer states").bytes == N * 12 / world  # fp32 master + m + v
    assert plan.row("reference").bytes == N * 2 / world  # weights only
    # gathered: min(2 models x N, max(max_live 1000, largest module 1024)) = 1024 elements x 2 B;
    # plus the reduce bucket: 100 x 2 B
    assert plan.row("ZeRO buffers").bytes == 1024 * 2 + 100 * 2
    assert plan.row("optimizer step").bytes == N / world * 8


def test_activations_and_lm_head_by_hand():
    plan = plan_memory(TINY, ds3(world_size=2))
    # 2 pairs -> 4 rows x 8 tokens = T = 32 tokens, a = 2 bytes.
    # per token and layer: norms 2 * (4*16 + 2*2*16) = 256; flash attention 2 * (2*16 + 2*8) + 4 * 4 heads = 112;
    # SwiGLU 4 * 2 * 32 = 256 -> 624.
    assert layer_bytes_per_token(TINY, plan.setup, 8) == 624
    checkpoints = 2 * 32 * 16 * 2  # L x T x h x a
    recomputed = 32 * 624
    working = 32 * 2 * (3 * 32 + 2 * 16)
    final_norm = 32 * (4 * 16 + 2 * 2 * 16)
    assert plan.row("activations").bytes == checkpoints + recomputed + working + final_norm
    # DPO: 4 rows x (8 - 1) = 28 completion positions, one chunk (2048 > 28): the fp32 logits kept for
    # backward 28 x 64 x 4 + that chunk's backward 28 x 64 x 12 + hidden and its gradient 28 x 16 x 2 x 2
    # + the head's weight gradient 64 x 16 x 2
    assert plan.row("LM head").bytes == 28 * 64 * 4 + 28 * 64 * 12 + 28 * 16 * 2 * 2 + 64 * 16 * 2 == 32512
    # the old full-vocabulary count was T x V x (4 + 2a) + 8 x s x V = 20480: not what the code allocates now
    assert plan.row("LM head").bytes != 32 * 64 * 8 + 8 * 8 * 64
    # SFT: the same batch is 2 rows, 2 x 7 = 14 labelled positions
    sft = plan_memory(TINY, ds3(world_size=2, module="sft"))
    assert sft.row("LM head").bytes == 14 * 64 * 4 + 14 * 64 * 12 + 14 * 16 * 2 * 2 + 64 * 16 * 2 == 17280
    assert sft.row("reference").bytes == 0


def test_lm_head_in_chunks_by_hand():
    # 28 positions in chunks of 10: 10, 10, 8. The backward runs the last chunk first; at chunk k the
    # logits of chunks 0..k are still kept: k=0: 4*64*10 + 12*64*10 = 10240; k=1: 4*64*20 + 12*64*10 = 12800;
    # k=2: 4*64*28 + 12*64*8 = 13312 (the peak); + hidden and its gradient 28 x 16 x 2 x 2 = 1792
    # + the head's weight gradient 64 x 16 x 2 = 2048.
    plan = plan_memory(TINY, ds3(world_size=2, chunk_tokens=10))
    assert plan.row("LM head").bytes == 13312 + 1792 + 2048
    assert lm_head_training_bytes(28, 64, 16, 2, 10, gradient_bytes=2) == 13312 + 1792 + 2048
    # no grad, bf16, 14 positions in chunks of 5 (5, 5, 4): per chunk max(4 x previous + (2 + 4) x this,
    # 8 x this) logits: 40, 50, 44 -> 50 x 64 = 3200; + the hidden states 14 x 16 x 2 = 448
    assert lm_head_no_grad_bytes(14, 64, 16, 2, 5) == 3200 + 448
    # fp32 (no copy): max(4 x previous + 4 x this, 8 x this): 40, 40, 36 -> 40 x 64; hidden 14 x 16 x 4
    assert lm_head_no_grad_bytes(14, 64, 16, 4, 5) == 40 * 64 + 14 * 16 * 4
    assert lm_head_training_bytes(0, 64, 16, 2, 10, 2) == lm_head_no_grad_bytes(0, 64, 16, 2, 10) == 0


def test_labelled_positions_bound():
    # a row's first token is never a label: rows x (max_length - 1)
    assert labelled_positions(8, 2048) == 8 * 2047
    s = main_plan("+experiment=zephyr-7b-beta-ddpo").setup
    assert labelled_positions(s.rows, s.max_length) == 4 * 1023


def test_chunk_tokens_is_the_training_code_default():
    from zephyr_lit.logprobs import completion_scores, model_completion_scores

    for function in (completion_scores, model_completion_scores):
        assert inspect.signature(function).parameters["chunk_tokens"].default == CHUNK_TOKENS


def test_total_is_resident_plus_the_largest_phase_plus_overhead():
    setup = ds3(world_size=2, context_gib=0.5, overhead_fraction=0.1)
    plan = plan_memory(TINY, setup)
    resident_rows = ("parameters", "gradients", "optimizer states", "reference", "ZeRO buffers")
    resident = sum(plan.row(k).bytes for k in resident_rows)
    phases = {
        "train": plan.row("activations").bytes + plan.row("LM head").bytes,
        "step": plan.row("optimizer step").bytes,
        "eval": plan.row("validation").bytes,
    }
    assert plan.peak_phase == max(phases, key=phases.get) == "train"
    subtotal = resident + phases["train"]
    assert plan.row("overhead").bytes == pytest.approx(0.5 * GIB + 0.1 * subtotal)
    assert plan.total_bytes == pytest.approx(subtotal * 1.1 + 0.5 * GIB)
    assert not plan.row("optimizer step").counted and not plan.row("validation").counted


def test_precompute_frees_the_reference():
    plan = plan_memory(TINY, ds3(world_size=4, ref_precompute=True))
    assert plan.row("reference").bytes == 0
    # the reference exists only in the precompute pass: eval_batch_size 1 pair = 2 rows x 8 = 16 tokens
    working = 16 * (2 * (3 * 32 + 3 * 16) + 4 * 16)
    # no-grad LM head at 2 x 7 = 14 completion positions, one chunk: its fp32 logits + logsumexp's fp32
    # workspace, 14 x 64 x 8 (more than the bf16 output + fp32 copy, 14 x 64 x 6); the hidden states 14 x 16 x 2
    head = 14 * 64 * 8 + 14 * 16 * 2
    assert plan.row("ref precompute").bytes == N * 2 / 4 + working + head
    # validation: the same pass (policy and reference run one after the other)
    assert plan.row("validation").bytes == working + head


def test_persistent_small_parameters_stay_whole():
    plan = plan_memory(TINY, ds3(world_size=4, param_persistence_threshold=16))
    small = 2 * 2 * 16 + 16  # the five RMSNorm weights
    assert plan.row("parameters").bytes == (N - small) * 2 / 4 + small * 2


def test_stage2_ddp_and_single_device():
    stage2 = plan_memory(TINY, ds3(world_size=4, zero_stage=2, allgather_bucket_size=300, overlap_comm=True))
    assert stage2.row("parameters").bytes == N * 2  # replicated
    assert stage2.row("gradients").bytes == N * 2 / 4
    assert stage2.row("optimizer states").bytes == N * 12 / 4
    assert stage2.row("ZeRO buffers").bytes == 4.5 * (300 * 2 + 100 * 2)
    ddp = plan_memory(TINY, ds3(world_size=4, strategy="ddp", model_dtype="float32", precision="32-true"))
    assert ddp.row("parameters").bytes == N * 4
    assert ddp.row("gradients").bytes == N * 4
    assert ddp.row("optimizer states").bytes == N * 8  # torch AdamW m, v in fp32, no master copy
    assert ddp.row("DDP buckets").bytes == N * 4
    single = plan_memory(TINY, ds3(world_size=1, strategy="single", precision="bf16-true"))
    assert single.row("optimizer states").bytes == N * 4  # m, v in bf16
    assert single.row("ZeRO buffers").bytes == 0


def test_offload_moves_states_off_the_gpu():
    plan = plan_memory(TINY, ds3(world_size=2, offload_optimizer=True, offload_parameters=True))
    assert plan.row("parameters").bytes == 0
    assert plan.row("optimizer states").bytes == 0
    assert plan.row("optimizer step").bytes == 0
    assert plan.row("gradients").bytes == N * 2 / 2


def saved_by_first_layer(model, layer, input_ids, attention_mask=None, autocast: bool = False) -> int:
    """Bytes of the storages that ``layer`` (the model's first decoder layer) saves for backward in one
    forward of ``model``, weights left out (each storage once)."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    forward = layer.forward

    def saving_forward(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            return forward(*args, **kwargs)

    layer.forward = saving_forward
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in weights)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_estimate_matches_what_autograd_saves(attn, dtype):
    """The per-layer formula against the bytes a real decoder layer saves for backward (CPU)."""
    config = MistralConfig(vocab_size=128, hidden_size=128, intermediate_size=352, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, attn_implementation=attn)
    model = MistralForCausalLM(config).to(dtype).train()
    rows, seq = 2, 64
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[1, :5] = 0  # padding: transformers passes a mask, as with real batches
    saved = saved_by_first_layer(model, model.model.layers[0], torch.randint(0, 128, (rows, seq)), mask)
    setup = Setup(attn_implementation=attn, model_dtype=str(dtype).removeprefix("torch."))
    estimate = layer_bytes_per_token(ModelShape.from_config(config), setup, seq) * rows * seq
    assert estimate == pytest.approx(saved, rel=0.10)


class LiveStorageBytes(TorchDispatchMode):
    """An allocation counter for CPU: every storage an aten op creates while the mode is on is counted
    from its creation to its release (``weakref.finalize`` on the storage, which torch keeps alive as
    long as the storage lives), as a list of +/- events. Storages that existed before (``existing``:
    inputs, weights) and views of them are not counted. ``peak(leaving_out)`` is the highest live
    sum, without the storages of the tensors in ``leaving_out``."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[int, int] = {}  # data_ptr -> storage number
        self.events: list[tuple[int, int]] = []  # (storage number, +bytes at creation / -bytes at release)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.track(tensor.untyped_storage())
        return out

    def track(self, storage) -> None:
        ptr, size = storage.data_ptr(), storage.nbytes()
        if size and ptr not in self.existing and ptr not in self.live:
            number = self.live[ptr] = len(self.events)
            self.events.append((number, size))
            weakref.finalize(storage, self.release, ptr, number, size)

    def release(self, ptr: int, number: int, size: int) -> None:
        self.live.pop(ptr, None)
        self.events.append((number, -size))

    def peak(self, leaving_out: list[torch.Tensor] = ()) -> int:
        left_out = {self.live[t.untyped_storage().data_ptr()] for t in leaving_out}
        now = top = 0
        for number, delta in self.events:
            if number not in left_out:
                now += delta
                top = max(top, now)
        return top


def measured_lm_head(labels: torch.Tensor, vocab: int, hidden: int, dtype, chunk_tokens: int, train: bool) -> int:
    """Peak bytes that ``completion_scores`` allocates (forward, and backward when ``train``) on CPU for
    hidden states ``(R, T, hidden)`` and a ``vocab x hidden`` head in ``dtype``. Left out: the hidden
    states' gradient, made after the head's backward (it flows into the decoder: activations)."""
    torch.manual_seed(0)
    states = torch.randn(*labels.shape, hidden, dtype=dtype, requires_grad=train)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(dtype).requires_grad_(train)
    counter = LiveStorageBytes([states, head.weight, labels])
    with counter, torch.set_grad_enabled(train):
        scores = completion_scores(states, head, labels, chunk_tokens)
        if train:
            scores.logp_sum.sum().backward()
    del scores
    return counter.peak([states.grad] if train else [])


def dpo_like_labels(vocab: int) -> torch.Tensor:
    """4 right-padded rows of length 129: prompts (-100) of 10, 30, 5, 50 tokens, real lengths 129, 100,
    80, 129 -> 119 + 70 + 75 + 79 = 343 completion positions (chunks of 128: 128, 128, 87)."""
    labels = torch.randint(0, vocab, (4, 129))
    for row, (prompt, length) in enumerate([(10, 129), (30, 100), (5, 80), (50, 129)]):
        labels[row, :prompt] = -100
        labels[row, length:] = -100
    return labels


LM_HEAD_TOLERANCE = 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_head_row_matches_the_measured_allocation(dtype):
    """The LM-head row against what ``completion_scores`` allocates on CPU, within 3%. What the row
    leaves out, the int64 index tensors (~40 B per labelled position against 4 x V = 4096 B of kept
    logits), is ~0.3% here. It counts the hidden states' gradient buffer and the head's weight
    gradient, present at the peak in both cases here (the peak is the last chunk but one through
    backward); when the first chunk through backward peaks they do not exist yet and the row is high
    by them: ~2.5% at these sizes, ~0.3% at 7B scale. CUDA's caching allocator rounds blocks up: that is
    the plan's fragmentation allowance, not this row. The old full-vocabulary count (T x V x 12), a
    count of one chunk only (if nothing were kept across chunks) and the bound N x V x 4 + n x V x 12
    (the last chunk counted as a full one: 13% high for the DPO rows) all lie outside the tolerance."""
    shape = ModelShape(vocab=1024, hidden=16, intermediate=32, layers=1, heads=2, kv_heads=1, head_dim=8)
    precision = "bf16-true" if dtype == torch.bfloat16 else "32-true"
    # SFT with assistant_only_loss=false: every token but the first labelled, 4 x 100 = 400 positions
    # = chunks of 128, 128, 128, 16 (the peak is the last chunk but one through backward)
    setup = Setup(module="sft", batch_size=4, max_length=101, precision=precision, chunk_tokens=128,
                  assistant_only_loss=False)
    labels = torch.randint(0, 1024, (4, 101))
    labels[:, 0] = -100
    row = plan_memory(shape, setup).row("LM head").bytes
    measured = measured_lm_head(labels, 1024, 16, dtype, 128, train=True)
    assert row == pytest.approx(measured, rel=LM_HEAD_TOLERANCE)
    assert 4 * 101 * 1024 * 12 > measured * (1 + 5 * LM_HEAD_TOLERANCE)  # the old logits formula
    assert 128 * 1024 * (4 + 12) < measured * (1 - 5 * LM_HEAD_TOLERANCE)  # one chunk only
    # DPO-shaped rows: the formula at the counted completion positions
    labels = dpo_like_labels(1024)
    completions = int((labels[:, 1:] != -100).sum())
    assert completions == 343
    a = 2 if dtype == torch.bfloat16 else 4
    measured = measured_lm_head(labels, 1024, 16, dtype, 128, train=True)
    estimate = lm_head_training_bytes(completions, 1024, 16, a, 128, gradient_bytes=a)
    assert estimate == pytest.approx(measured, rel=LM_HEAD_TOLERANCE)
    loose_bound = completions * 1024 * 4 + 128 * 1024 * 12 + completions * 16 * 2 * a + 1024 * 16 * a
    assert loose_bound > measured * (1 + 3 * LM_HEAD_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_head_without_gradients_matches_the_measured_allocation(dtype):
    """The no-grad head (validation, reference, precompute) against the CPU allocation, within 3% (the
    same index tensors left out). In bf16 the previous chunk's fp32 logits are still bound while the
    next chunk's head output and its fp32 copy are made: 10 B per logit of a chunk, not 8."""
    labels = dpo_like_labels(1024)
    a = 2 if dtype == torch.bfloat16 else 4
    measured = measured_lm_head(labels, 1024, 16, dtype, 128, train=False)
    assert lm_head_no_grad_bytes(343, 1024, 16, a, 128) == pytest.approx(measured, rel=LM_HEAD_TOLERANCE)


# ---- config reading -----------------------------------------------------------------------------------------
def main_plan(*overrides: str, **kw):
    from zephyr_lit.plan import plan_from_overrides

    return plan_from_overrides(list(overrides), **kw)[0]


def test_zephyr_dsft_setup():
    s = main_plan("+experiment=zephyr-7b-beta-dsft").setup
    assert (s.module, s.world_size, s.batch_size, s.max_length) == ("sft", 16, 8, 2048)
    assert (s.strategy, s.zero_stage, s.offload_optimizer, s.offload_parameters) == ("deepspeed", 3, False, False)
    assert s.master_weights and s.weight_bytes == 2 and s.activation_bytes == 2
    assert s.gradient_checkpointing and s.attn_implementation == "flash_attention_2"
    assert s.packing and not s.assistant_only_loss and (s.length_groups, s.passes) == (1, 1)


def test_zephyr_ddpo_setup_and_shape_of_the_future_export():
    plan = main_plan("+experiment=zephyr-7b-beta-ddpo")
    s = plan.setup
    assert (s.module, s.world_size, s.batch_size, s.rows, s.ref_precompute) == ("dpo", 16, 2, 4, False)
    assert plan.shape.num_parameters() == 7_241_732_096
    assert "+experiment=zephyr-7b-beta-dsft" in plan.shape.source
    assert (s.length_groups, s.passes) == (4, 1)  # module.length_groups=4, but one pass under DeepSpeed
    tiny = main_plan("+experiment=ddpo").setup
    assert (tiny.strategy, tiny.length_groups, tiny.passes) == ("single", 4, 4)
    precomputed = main_plan("+experiment=zephyr-7b-beta-ddpo", "dpo.ref.precompute=true")
    assert precomputed.row("reference").bytes == 0


def test_an_existing_export_is_read(tmp_path):
    export = tmp_path / "dsft" / "latest" / "model"
    export.mkdir(parents=True)
    config = json.loads((Path(asset_path("tiny-mistral")) / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**config, "hidden_size": 64, "head_dim": 16}))
    plan = main_plan("+experiment=ddpo", f"paths.root={tmp_path}")
    assert plan.shape.hidden == 64 and plan.shape.source == f"{export}/config.json"


def test_strategies_from_the_config():
    offload = setup_from_config(compose_config(["+experiment=zephyr-7b-beta-dsft", "strategy=deepspeed_zero3_offload"]))
    assert offload.offload_optimizer and offload.offload_parameters and offload.zero_stage == 3
    ddp = setup_from_config(compose_config(["strategy=ddp", "trainer.devices=2"]))
    assert (ddp.strategy, ddp.world_size) == ("ddp", 2)
    auto = setup_from_config(compose_config(["trainer.devices=4"]))
    assert auto.strategy == "ddp"
    cfg = compose_config([])
    cfg.strategy = OmegaConf.create({"_target_": "lightning.pytorch.strategies.DeepSpeedStrategy", "stage": 2})
    kwargs = setup_from_config(cfg, world_size=8)
    assert (kwargs.zero_stage, kwargs.reduce_bucket_size, kwargs.overlap_comm) == (2, 200_000_000, True)
    assert kwargs.world_size == 8


def test_lightning_defaults_are_the_installed_ones():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    params = inspect.signature(DeepSpeedStrategy.__init__).parameters
    assert {k: params[k].default for k in LIGHTNING_DEEPSPEED_DEFAULTS} == LIGHTNING_DEEPSPEED_DEFAULTS


def test_deepspeed_defaults_are_the_installed_ones():
    config = pytest.importorskip("deepspeed.runtime.zero.config")
    zero = config.DeepSpeedZeroConfig()
    names = {
        "allgather_bucket_size": "allgather_bucket_size",
        "reduce_bucket_size": "reduce_bucket_size",
        "sub_group_size": "sub_group_size",
        "stage3_max_live_parameters": "max_live_parameters",
        "stage3_prefetch_bucket_size": "prefetch_bucket_size",
        "stage3_param_persistence_threshold": "param_persistence_threshold",
    }
    assert {k: getattr(zero, field) for k, field in names.items()} == DEEPSPEED_DEFAULTS


# ---- CLI --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", ["zephyr-7b-beta-dsft", "zephyr-7b-beta-ddpo"])
def test_cli_prints_the_table_and_a_verdict(experiment, capsys):
    assert main([f"+experiment={experiment}", "--gpu-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    for item in ("parameters", "gradients", "optimizer states", "reference", "activations", "LM head",
                 "ZeRO buffers", "overhead", "total"):
        assert f"\n  {item} " in out
    assert "7,241,732,096 parameters" in out
    assert "world size  16 (2 nodes x 8 devices)" in out
    assert "fits in 80 GiB: yes (" in out


def test_cli_huge_batch_does_not_fit(capsys):
    assert main(["+experiment=zephyr-7b-beta-dsft", "data.batch_size=256"]) == 0
    assert "fits in 80 GiB: no, does NOT fit (" in capsys.readouterr().out


def test_cli_bad_input_is_one_line(capsys):
    assert main(["+experiment=no-such-experiment"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot compose the config") and err.count("\n") == 1
    assert main(["trainer.devices=auto"]) == 2
    assert "pass --world-size" in capsys.readouterr().err
    assert main(["--arch", "nobody/no-model"]) == 2
    assert "pass --arch" in capsys.readouterr().err


def test_setup_rejects_nonsense():
    with pytest.raises(UserInputError, match="data.batch_size=0"):
        plan_memory(TINY, ds3(batch_size=0))


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "zephyr_lit.plan", "+experiment=zephyr-7b-beta-ddpo", "--world-size", "8"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "world size  8 (--world-size)" in result.stdout and "fits in 80 GiB: yes" in result.stdout



# ---- adapters: LoRA and QLoRA -------------------------------------------------------------------------------------
MISTRAL = ModelShape.from_config(KNOWN_SHAPES["mistralai/Mistral-7B-v0.1"])


def test_lora_parameters_of_mistral_7b_by_hand():
    """LoRA adds r (d_in + d_out) per targeted linear. Mistral-7B (h 4096, q 32 x 128 = 4096, k/v 8 x 128 =
    1024, MLP 14336), r = 16 on all seven linears of a layer:
        q 16 x (4096 + 4096) = 131,072    k 16 x (4096 + 1024) = 81,920    v 81,920    o 131,072
        gate 16 x (4096 + 14336) = 294,912    up 294,912    down 16 x (14336 + 4096) = 294,912
        -> 1,310,720 per layer x 32 layers = 41,943,040 (0.58% of 7,241,732,096).
    r = 128: 8 x that = 335,544,320. r = 8 on q and v only: 32 x 8 x (8192 + 5120) = 3,407,872."""
    assert lora_parameters(MISTRAL, Adapter(r=16)) == 41_943_040
    assert lora_parameters(MISTRAL, Adapter(r=128)) == 335_544_320
    assert lora_parameters(MISTRAL, Adapter(r=8, targets=("q_proj", "v_proj"))) == 3_407_872


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=["gqa", "mha-tied", "head-dim", "llama-bias"])
def test_lora_count_matches_peft(config):
    """Against peft's own adapter on a real model: all-linear, and two named targets."""
    from zephyr_lit.adapters import AdapterSpec, add_adapter

    for targets in ("all-linear", ["k_proj", "down_proj"]):
        model = (LlamaForCausalLM if config.model_type == "llama" else MistralForCausalLM)(config)
        adapted = add_adapter(model, AdapterSpec(method="lora", r=4, target_modules=targets), False)
        trained = [p for p in adapted.parameters() if p.requires_grad]
        adapter = Adapter(r=4, targets=None if targets == "all-linear" else tuple(targets))
        assert sum(p.numel() for p in trained) == lora_parameters(ModelShape.from_config(config), adapter)


def test_nf4_bytes_by_hand_and_as_bitsandbytes_stores_them():
    """A 4096 x 4096 weight (16,777,216 elements, 262,144 blocks of 64): 8,388,608 B of 4-bit codes; without
    double quantisation 262,144 fp32 absmax = 1,048,576 B (0.5 bit per weight); with it 262,144 B of 8-bit
    absmax + 1,024 fp32 scales (one per 256 blocks) + one fp32 offset = 266,244 B (0.127 bit per weight)."""
    assert nf4_bytes(4096 * 4096, double_quant=False) == 8_388_608 + 1_048_576
    assert nf4_bytes(4096 * 4096, double_quant=True) == 8_388_608 + 262_144 + 4_096 + 4
    assert 266_244 * 8 / 4096**2 == pytest.approx(0.127, abs=5e-4)
    functional = pytest.importorskip("bitsandbytes.functional")
    for rows, cols in ((256, 320), (64, 100)):  # 1280 blocks (5 scales); 100 blocks (1 scale)
        for double_quant in (True, False):
            packed, state = functional.quantize_4bit(torch.randn(rows, cols, dtype=torch.bfloat16), blocksize=64,
                                                     compress_statistics=double_quant, quant_type="nf4")
            stored = [packed, state.absmax] + ([state.state2.absmax, state.offset] if double_quant else [])
            assert sum(t.numel() * t.element_size() for t in stored) == nf4_bytes(rows * cols, double_quant)


def qlora_setup(**kw) -> Setup:
    base = dict(module="sft", batch_size=4, max_length=2048, model_dtype="bfloat16", precision="bf16-mixed",
                gradient_checkpointing=True, attn_implementation="flash_attention_2", context_gib=0.0,
                overhead_fraction=0.0, adapter=Adapter(method="qlora", r=16))
    return Setup(**{**base, **kw})


def test_qlora_rows_of_mistral_7b_by_hand():
    """The frozen base: each q / o weight 8,654,852 B, each k / v (4,194,304 elements: 2,097,152 + 65,536 + 256 x 4
    + 4) 2,163,716 B, each gate / up / down (58,720,256: 29,360,128 + 917,504 + 3,584 x 4 + 4) 30,291,972 B ->
    112,513,052 B per layer x 32 = 3,600,417,664 B; the 262,410,240 unquantised (embeddings 2 x 131,072,000,
    norms 266,240) x 2 B = 524,820,480 B -> 4,125,238,144 B (3.84 GiB). The adapter (r 16: 41,943,040) is fp32:
    x 4 weights, x 4 gradients, x 8 AdamW m and v. No reference; the LM head has no weight gradient."""
    plan = plan_memory(MISTRAL, qlora_setup())
    assert plan.row("base weights").bytes == 3_600_417_664 + 524_820_480 == 4_125_238_144
    without = plan_memory(MISTRAL, qlora_setup(adapter=Adapter(method="qlora", r=16, double_quant=False)))
    # without double quantisation each weight costs 0.5 + 4 / 64 B: 6,979,321,856 x 0.5625
    assert without.row("base weights").bytes == 6_979_321_856 * 0.5625 + 524_820_480
    a = 41_943_040
    assert (plan.row("adapter").bytes, plan.row("gradients").bytes) == (a * 4, a * 4)
    assert plan.row("optimizer states").bytes == a * 8 and plan.row("optimizer step").bytes == a * 4
    assert plan.row("reference").bytes == 0
    # 4 rows x 2047 labelled positions, chunks of 2048: no V x h x g head gradient (the head is frozen)
    assert plan.row("LM head").bytes == lm_head_training_bytes(4 * 2047, 32000, 4096, 2, 2048, gradient_bytes=0)
    assert plan.row("4-bit dequant").bytes == 14336 * 4096 * 2  # gate/up/down, bf16
    lora = plan_memory(MISTRAL, qlora_setup(adapter=Adapter(method="lora", r=16)))
    assert lora.row("base weights").bytes == 7_241_732_096 * 2  # frozen bf16, whole
    assert [r.item for r in lora.rows].count("4-bit dequant") == 0


def test_an_adapters_reference_is_free_and_zero3_shards_base_and_adapter():
    """TINY (N = 6736) with LoRA r = 2 on all linears, r (d_in + d_out) each: q 2 x (16 + 16) = 64, k 2 x (16 + 8)
    = 48, v 48, o 64, gate / up / down 2 x (16 + 32) = 96 each -> 512 per layer; 2 layers: A = 1024, in tensors
    A (r x d_in) and B (d_out x r) of at most 2 x 32 = 64 elements."""
    lora = Adapter(method="lora", r=2, dropout=0.0)
    assert lora_parameters(TINY, lora) == 1024
    plan = plan_memory(TINY, ds3(world_size=4, adapter=lora, param_persistence_threshold=0))
    assert plan.row("base weights").bytes == N * 2 / 4  # frozen, partitioned like full fine-tuning's weights
    assert plan.row("adapter").bytes == 1024 * 2 / 4  # the engine holds it in 16 bit ...
    assert plan.row("optimizer states").bytes == 1024 * 12 / 4  # ... with an fp32 master copy + m, v
    assert plan.row("gradients").bytes == 1024 * 2 / 4
    assert plan.row("reference").bytes == 0
    # one live model (the reference is the policy): gathered min(N, max(1000, 1024)) = 1024 x 2 + bucket 100 x 2
    assert plan.row("ZeRO buffers").bytes == 1024 * 2 + 100 * 2
    persistent = plan_memory(TINY, ds3(world_size=4, adapter=lora, param_persistence_threshold=64))
    assert persistent.row("adapter").bytes == 1024 * 2  # every adapter tensor is small: kept whole
    precomputed = plan_memory(TINY, ds3(world_size=4, adapter=lora, ref_precompute=True))
    assert precomputed.row("ref precompute").bytes == precomputed.row("validation").bytes  # no reference weights
    ddp = plan_memory(TINY, ds3(world_size=2, adapter=lora, strategy="ddp"))
    assert ddp.row("DDP buckets").bytes == 1024 * 4  # buckets hold the adapter's fp32 gradients only
    with pytest.raises(UserInputError, match="peft=qlora with DeepSpeed ZeRO-3"):
        plan_memory(TINY, ds3(adapter=Adapter(method="qlora", r=2)))
    with pytest.raises(UserInputError, match="peft.target_modules: lm_head not among"):
        plan_memory(TINY, ds3(adapter=Adapter(r=2, targets=("q_proj", "lm_head"))))


LORA_LAYER_CASES = {  # (model dtype, autocast, dropout); the adapter is fp32 in all of them (peft's default)
    "fp32-shared-input": (torch.float32, False, 0.0),
    "fp32-dropout": (torch.float32, False, 0.05),
    "bf16-cast-to-fp32": (torch.bfloat16, False, 0.0),
    "bf16-autocast-dropout": (torch.bfloat16, True, 0.05),  # the QLoRA recipes' case
}


@pytest.mark.parametrize("dtype, autocast, dropout", LORA_LAYER_CASES.values(), ids=LORA_LAYER_CASES.keys())
def test_lora_layer_estimate_matches_what_autograd_saves(dtype, autocast, dropout):
    """What LoRA changes in a layer's saved tensors, against a real layer with and without a peft adapter (CPU).
    With a copy of the adapter's input (dropout, or a cast to its fp32) the frozen base's inputs go and each of
    the 7 targets keeps its own; without one they share the base's. CPU keeps a dropout mask as floats (4 B);
    CUDA as bools (1 B, the plan's default). Tolerance: 3% of the LoRA layer's bytes (autocast's bf16 copies
    of the adapter weights are per batch, not per token: ~1% at these 512 tokens); the layer itself within 10%,
    as full fine-tuning's."""
    from zephyr_lit.adapters import AdapterSpec, add_adapter

    config = MistralConfig(vocab_size=128, hidden_size=128, intermediate_size=352, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, attn_implementation="sdpa")
    rows, seq = 4, 128
    ids = torch.randint(0, 128, (rows, seq))
    torch.manual_seed(0)
    full = MistralForCausalLM(config).to(dtype).train()
    full_saved = saved_by_first_layer(full, full.model.layers[0], ids, autocast=autocast)
    adapted = add_adapter(MistralForCausalLM(config).to(dtype), AdapterSpec(method="lora", r=8, dropout=dropout), True)
    lora_saved = saved_by_first_layer(adapted, adapted.get_base_model().model.layers[0], ids, autocast=autocast)

    shape, adapter = ModelShape.from_config(config), Adapter(r=8, dropout=dropout)
    setup = Setup(model_dtype=str(dtype).removeprefix("torch."), precision="bf16-mixed" if autocast else "32-true",
                  adapter=adapter)
    a = setup.activation_bytes
    saved = a if autocast else 4
    copies = dropout > 0 or a != 4
    delta = lora_layer_bytes_per_token(shape, adapter, a, saved, copies, mask_bytes=4)
    if dropout == 0:  # the run's own choice of s and copies (the mask does not matter then)
        assert adapter_layer_bytes(shape, setup) == delta
    assert delta * rows * seq == pytest.approx(lora_saved - full_saved, abs=0.03 * lora_saved)
    estimate = (layer_bytes_per_token(shape, setup, seq) + delta) * rows * seq
    assert estimate == pytest.approx(lora_saved, rel=0.10)


def test_the_qlora_base_row_is_what_bitsandbytes_holds(tmp_path):
    """The embedded tiny Mistral (4 layers, h 128, MLP 384, vocab 1024) built as ``peft=qlora`` builds it: the
    frozen bytes (4-bit codes and their constants, bf16 rest) and the trainable fp32 adapter, as planned."""
    pytest.importorskip("bitsandbytes")
    from zephyr_lit.adapters import AdapterSpec, build_trained_model
    from zephyr_lit.models import ModelSpec

    spec = ModelSpec(name_or_path=asset_path("tiny-mistral"), dtype="bfloat16", random_init=True)
    model = build_trained_model(spec, AdapterSpec(method="qlora", r=4, double_quant=True))
    frozen = 0
    for p in model.parameters():
        if not p.requires_grad:
            frozen += p.numel() * p.element_size()
            state = getattr(p, "quant_state", None)  # a 4-bit weight's packed codes; its constants beside it
            if state is not None:
                frozen += sum(t.numel() * t.element_size() for t in (state.absmax, state.state2.absmax, state.offset))
    trained = [p for p in model.parameters() if p.requires_grad]
    shape = ModelShape.from_config(MistralConfig.from_pretrained(asset_path("tiny-mistral")))
    plan = plan_memory(shape, Setup(model_dtype="bfloat16", precision="bf16-mixed",
                                    adapter=Adapter(method="qlora", r=4, double_quant=True)))
    assert frozen == plan.row("base weights").bytes
    assert sum(p.numel() * p.element_size() for p in trained) == plan.row("adapter").bytes
    assert {p.dtype for p in trained} == {torch.float32}


def test_the_qlora_recipes_plan_from_their_config(capsys):
    """The one-GPU recipes read as configured: peft, rank, double quantisation, the paged optimizer."""
    dsft = main_plan("+experiment=zephyr-7b-beta-dsft-qlora")
    assert dsft.setup.adapter == Adapter(method="qlora", r=16, dropout=0.05, double_quant=True, targets=(
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert (dsft.setup.world_size, dsft.setup.strategy, dsft.setup.paged_optimizer) == (1, "single", False)
    ddpo = main_plan("+experiment=zephyr-7b-beta-ddpo-qlora")
    assert ddpo.setup.adapter.r == 128 and ddpo.setup.paged_optimizer and ddpo.setup.rows == 8
    assert ddpo.row("adapter").bytes == 335_544_320 * 4 and ddpo.row("reference").bytes == 0
    assert "+experiment=zephyr-7b-beta-dsft-qlora" in ddpo.shape.source  # the merged dSFT export's shape
    assert main_plan("+experiment=dsft", "peft=lora").setup.adapter.targets is None  # all-linear
    assert main(["+experiment=zephyr-7b-beta-ddpo-qlora"]) == 0
    out = capsys.readouterr().out
    assert "  adapter     LoRA r=128 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj x 32 layers: " \
           "335,544,320 trainable (4.63%)" in out
    assert "dpo (reference = the policy with its adapter off)" in out and "fits in 80 GiB: yes (" in out
    assert main(["+experiment=zephyr-7b-beta-ddpo", "peft=qlora"]) == 2  # ZeRO-3
    assert "peft=qlora with DeepSpeed ZeRO-3" in capsys.readouterr().err
