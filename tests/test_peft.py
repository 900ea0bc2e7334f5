"""LoRA and QLoRA (``peft=lora|qlora``), unit level: the reference is the policy with its adapter off and
scores exactly as a separately loaded start model; only the adapter trains and checkpoints hold it
alone; the merged export is ``W + (alpha / r) B A`` on the unquantised base; the adapter's lr; the
config refusals, all in one message before any model."""

from __future__ import annotations

import pytest
import torch

from zephyr_lit.adapters import (
    AdapterSpec,
    adapter_weights,
    build_trained_model,
    export_adapter,
    learning_rate,
    merged_model,
    quantization_config,
    trainable_names,
)
from zephyr_lit.assets import TINY_MODEL, asset_path
from zephyr_lit.errors import ConfigError
from zephyr_lit.export import export_model
from zephyr_lit.logprobs import model_completion_scores, split_head
from zephyr_lit.models import ModelSpec, build_model, load_tokenizer
from zephyr_lit.run import prepare_run

LINEAR_LAYERS = 4 * 7  # the tiny Mistral: 4 blocks x (q, k, v, o, gate, up, down); the LM head is left out


@pytest.fixture(scope="module")
def start_model(tmp_path_factory) -> str:
    """A stand-in for the dSFT export: the tiny model, random init, saved as a Hugging Face folder."""
    spec = ModelSpec(name_or_path=asset_path(TINY_MODEL), random_init=True, init_seed=5)
    return str(export_model(build_model(spec), load_tokenizer(spec), tmp_path_factory.mktemp("start") / "model"))


def randomise_adapter(model: torch.nn.Module, seed: int = 0) -> None:
    """LoRA starts with B = 0 (the adapted model is the start model): give every A and B values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_with_the_adapter_off_the_policy_scores_as_a_separately_loaded_start_model(make_cfg, start_model, method):
    run = prepare_run(make_cfg("+experiment=ddpo", f"model.name_or_path={start_model}", f"peft={method}",
                               "data.max_train_samples=8", "data.max_eval_samples=8", "data.max_length=96",
                               "data.max_prompt_length=48"))
    module = run.module
    module.configure_model()
    assert module.reference is None  # no second model
    assert trainable_names(module) == {n for n, _ in module.named_parameters() if "lora_" in n}
    assert len(trainable_names(module)) == 2 * LINEAR_LAYERS  # A and B of every linear layer
    randomise_adapter(module.policy)
    spec = ModelSpec(name_or_path=start_model)
    quantization = quantization_config(AdapterSpec(method="qlora")) if method == "qlora" else None
    separate = build_model(spec, quantization=quantization).eval()  # the start model, 4-bit for qlora
    assert split_head(module.policy)[0] is module.policy.get_base_model().model  # the body inside the PeftModel
    batch = next(iter(run.datamodule.val_dataloader()))
    reference = module.reference_logps(batch, split="val")  # (2B,)
    with torch.no_grad():  # rows grouped into passes as the module does
        expected = model_completion_scores(separate, batch, max_groups=module.length_groups).logps()
    torch.testing.assert_close(reference, expected, rtol=0, atol=0)  # the same numbers, not "close"
    assert module.policy.training  # the reference pass left the policy in train mode
    module.train()  # Lightning's switch back after validation: the shared policy trains
    assert module.policy.training
    groups = module.length_groups
    with torch.no_grad():
        policy = model_completion_scores(module.policy.eval(), batch, max_groups=groups).logps()
    assert (policy - expected).abs().min() > 1e-2  # the adapter is on outside the reference pass
    if method == "qlora":
        with torch.no_grad():
            unquantised = model_completion_scores(build_model(spec).eval(), batch, max_groups=groups).logps()
        assert (unquantised - expected).abs().max() > 1e-3  # the base really is 4-bit


def test_the_adapter_lr_is_optim_lr_times_lr_scale_unless_the_command_line_sets_optim_lr(make_cfg, start_model):
    lora = AdapterSpec(method="lora", lr_scale=10.0)
    assert learning_rate(3e-5, lora, []) == pytest.approx(3e-4)
    assert learning_rate(3e-5, lora, ["optim.lr=3e-5", "trainer.max_steps=2"]) == 3e-5
    assert learning_rate(3e-5, lora, ["++optim.lr=3e-5"]) == 3e-5
    assert learning_rate(3e-5, lora, ["optim.lr_other=1"]) == pytest.approx(3e-4)
    assert learning_rate(3e-5, AdapterSpec(method="none"), []) == 3e-5
    cfg = make_cfg("+experiment=ddpo", f"model.name_or_path={start_model}", "peft=qlora", "data.max_train_samples=8",
                   "data.max_eval_samples=8")
    assert (cfg.peft.quant_type, cfg.peft.double_quant, cfg.peft.compute_dtype) == ("nf4", True, "bfloat16")
    assert (cfg.peft.r, cfg.peft.target_modules, cfg.optim.lr) == (16, "all-linear", 3e-5)
    assert prepare_run(cfg).module.optimizer_factory.keywords["lr"] == pytest.approx(3e-5 * cfg.peft.lr_scale)
    assert prepare_run(cfg, overrides=["optim.lr=3e-5"]).module.optimizer_factory.keywords["lr"] == 3e-5


def test_checkpoints_hold_the_adapter_alone_and_one_without_it_is_refused(make_cfg):
    run = prepare_run(make_cfg("peft=lora", "data.max_train_samples=8", "data.max_eval_samples=8"))
    module = run.module
    module.configure_model()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    kept = set(checkpoint["state_dict"])
    assert kept == trainable_names(module) and all("lora_" in k for k in kept) and len(kept) == 2 * LINEAR_LAYERS
    module.on_load_checkpoint(checkpoint)  # everything the adapter needs is there
    del checkpoint["state_dict"]["model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    with pytest.raises(RuntimeError, match=r"no values for 1 of the 56 adapter parameters .*layers\.0\.self_attn"):
        module.on_load_checkpoint(checkpoint)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_the_merged_export_is_w_plus_alpha_over_r_times_b_a_on_the_unquantised_base(tmp_path, start_model, method):
    spec = ModelSpec(name_or_path=start_model)
    adapter = AdapterSpec(method=method, r=4, alpha=8)
    model = build_trained_model(spec, adapter)
    randomise_adapter(model, seed=1)
    folder = export_adapter(model, load_tokenizer(spec), tmp_path / "adapter", adapter_weights(model))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    merged = merged_model(folder, spec, torch.float32)
    assert type(merged).__name__ == "MistralForCausalLM"  # plain transformers, no peft layers left
    base = build_model(spec)  # the unquantised start weights
    lora = model.get_base_model().model.layers[2].mlp.down_proj
    b, a = lora.lora_B["default"].weight, lora.lora_A["default"].weight  # (128, 4), (4, 384)
    by_hand = base.model.layers[2].mlp.down_proj.weight + (8 / 4) * b @ a
    torch.testing.assert_close(merged.model.layers[2].mlp.down_proj.weight, by_hand, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(merged.lm_head.weight, base.lm_head.weight, atol=0, rtol=0)  # not adapted
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    if method == "lora":  # the merged model computes what the adapted one did
        ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, model.eval()(ids).logits, atol=1e-4, rtol=1e-4)


def test_adapter_refusals_come_in_the_one_config_message_before_any_model(make_cfg, monkeypatch):
    from zephyr_lit import run

    def loaded(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the config check")

    monkeypatch.setattr(run, "load_tokenizer", loaded)
    cfg = make_cfg("+experiment=ddpo", "model.name_or_path=${asset:tiny-mistral}", "model.random_init=true",
                   "peft=qlora", "strategy=deepspeed_zero3", "dpo.ref.sync_steps=2", "peft.r=0", "peft.dropout=1.0",
                   "peft.quant_type=int3")
    with pytest.raises(ConfigError) as error:
        run.train(cfg)
    message = str(error.value)
    assert "\n" not in message
    for bad in ("peft.r=0: must be an integer >= 1", "peft.dropout=1.0: must be in [0, 1)",
                "peft.quant_type=int3: must be one of nf4, fp4",
                "peft=qlora with DeepSpeed ZeRO-3: a 4-bit base cannot be built inside deepspeed.zero.Init",
                "dpo.ref.sync_steps=2 with peft=qlora"):
        assert bad in message
    with pytest.raises(ConfigError, match="peft.method=dora: must be one of none, lora, qlora"):
        run.train(make_cfg("peft.method=dora"))


def test_a_random_init_base_is_quantised_from_the_same_seeded_weights():
    """``model.random_init`` with qlora: the seeded init, then 4 bits as it loads (NF4 of that very init)."""
    import bitsandbytes.functional as F

    spec = ModelSpec(name_or_path=asset_path(TINY_MODEL), random_init=True, init_seed=11)
    full = build_model(spec)
    four_bit = build_model(spec, quantization=quantization_config(AdapterSpec(method="qlora")))
    assert torch.equal(four_bit.model.embed_tokens.weight, full.model.embed_tokens.weight)  # never quantised
    weight = four_bit.model.layers[1].self_attn.o_proj.weight
    assert weight.dtype == torch.uint8  # packed NF4: two weights a byte
    restored = F.dequantize_4bit(weight.data, weight.quant_state).float()  # (128, 128)
    expected = full.model.layers[1].self_attn.o_proj.weight
    error = (restored - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.2  # 0.12: NF4's 16 levels of this very init (against seed 12's init: 1.5)


def adapter_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_a_no_grad_eval_pass_leaves_the_4bit_layers_gradients_as_they_were(start_model):
    """dDPO's reference pass (eval, no grad) runs on the very 4-bit layers that then train. bitsandbytes
    repacks a CPU 4-bit weight in place on its first such pass; the adapter's gradients afterwards must
    still be those of a model that never ran one (``models.keep_4bit_layout``)."""
    spec = ModelSpec(name_or_path=start_model)
    adapter = AdapterSpec(method="qlora", r=8, alpha=16, dropout=0.0)
    model = build_trained_model(spec, adapter)
    randomise_adapter(model)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    before = adapter_grads(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # the reference pass
    model.train()
    after = adapter_grads(model, ids)
    assert len(before) == 2 * LINEAR_LAYERS
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_with_gradient_checkpointing_the_adapter_gets_the_gradients_it_gets_without(start_model):
    """``model.gradient_checkpointing=true`` with an adapter: the embeddings' output requires grad (as peft
    needs for checkpointed blocks under a frozen base) and every A and B gets the same gradient as
    without checkpointing."""
    adapter = AdapterSpec(method="lora", r=8, alpha=16, dropout=0.0)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    grads = {}
    for checkpointing in (False, True):
        model = build_trained_model(ModelSpec(name_or_path=start_model, gradient_checkpointing=checkpointing), adapter)
        randomise_adapter(model)
        grads[checkpointing] = adapter_grads(model, ids)
    assert model.get_input_embeddings()(ids).requires_grad
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) == 2 * LINEAR_LAYERS
    for name, grad in grads[False].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_loading_a_4bit_model_does_not_warn_about_the_cpu_kernel_it_never_uses(start_model):
    """bitsandbytes' import-time warning about its repacked-layout CPU kernel (unusable offline, and
    never used: ``keep_4bit_layout``) stays out of a qlora run's output."""
    import subprocess
    import sys

    code = ("from zephyr_lit.adapters import AdapterSpec, quantization_config\n"
            "from zephyr_lit.models import ModelSpec, build_model\n"
            f"build_model(ModelSpec(name_or_path={start_model!r}), quantization_config(AdapterSpec(method='qlora')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gemm_4bit_forward" not in done.stderr + done.stdout
