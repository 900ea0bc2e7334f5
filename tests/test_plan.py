"""The memory planner: exact parameter counts, hand-computed bytes, config reading and the CLI."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from zephyr_lit.assets import asset_path
from zephyr_lit.errors import UserInputError
from zephyr_lit.plan import (
    DEEPSPEED_DEFAULTS,
    GIB,
    LIGHTNING_DEEPSPEED_DEFAULTS,
    ModelShape,
    Setup,
    compose_config,
    layer_bytes_per_token,
    main,
    plan_memory,
    setup_from_config,
)

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


def test_activations_and_logits_by_hand():
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
    # DPO: T x V x (4 + 2a) + two fp32 rows of scratch (8 x s x V)
    assert plan.row("logits").bytes == 32 * 64 * 8 + 8 * 8 * 64
    # SFT: the same batch is 2 rows = 16 tokens, T x V x 12
    sft = plan_memory(TINY, ds3(world_size=2, module="sft"))
    assert sft.row("logits").bytes == 16 * 64 * 12
    assert sft.row("reference").bytes == 0


def test_total_is_resident_plus_the_largest_phase_plus_overhead():
    setup = ds3(world_size=2, context_gib=0.5, overhead_fraction=0.1)
    plan = plan_memory(TINY, setup)
    resident_rows = ("parameters", "gradients", "optimizer states", "reference", "ZeRO buffers")
    resident = sum(plan.row(k).bytes for k in resident_rows)
    phases = {
        "train": plan.row("activations").bytes + plan.row("logits").bytes,
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
    logits = 16 * 64 * 2 + 8 * 8 * 64
    assert plan.row("ref precompute").bytes == N * 2 / 4 + working + logits
    # validation then needs the policy's logits only
    assert plan.row("validation").bytes == working + logits


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
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    layer = model.model.layers[0]
    forward = layer.forward

    def saving_forward(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            return forward(*args, **kwargs)

    layer.forward = saving_forward
    model(input_ids=torch.randint(0, 128, (rows, seq)), attention_mask=mask, use_cache=False)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(n for ptr, n in storages.items() if ptr not in weights)
    setup = Setup(attn_implementation=attn, model_dtype=str(dtype).removeprefix("torch."))
    estimate = layer_bytes_per_token(ModelShape.from_config(config), setup, seq) * rows * seq
    assert estimate == pytest.approx(saved, rel=0.10)


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


def test_zephyr_ddpo_setup_and_shape_of_the_future_export():
    plan = main_plan("+experiment=zephyr-7b-beta-ddpo")
    s = plan.setup
    assert (s.module, s.world_size, s.batch_size, s.rows, s.ref_precompute) == ("dpo", 16, 2, 4, False)
    assert plan.shape.num_parameters() == 7_241_732_096
    assert "+experiment=zephyr-7b-beta-dsft" in plan.shape.source
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
    for item in ("parameters", "gradients", "optimizer states", "reference", "activations", "logits",
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

