"""The one-GPU QLoRA recipes (``+experiment=zephyr-7b-beta-{dsft,ddpo}-qlora``): what ``--cfg job`` prints is
the alignment-handbook's ``recipes/zephyr-7b-beta/{sft,dpo}/config_qlora.yaml`` (commit 925acdf), the parts
that build on CPU build, and ``optim=paged_adamw_32bit`` is refused where it cannot run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import compose_config
from zephyr_lit import optimizers
from zephyr_lit.adapters import learning_rate, quantization_config
from zephyr_lit.optimizers import optimizer_problems

ROOT = Path(__file__).resolve().parents[1]
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # the handbook's list
EXPERIMENTS = ("zephyr-7b-beta-dsft-qlora", "zephyr-7b-beta-ddpo-qlora")


@pytest.fixture(scope="module")
def cfg_job() -> dict:
    """What ``python train.py +experiment=<experiment> --cfg job`` prints, parsed, for both recipes (the two
    processes run side by side)."""
    runs = {e: subprocess.Popen([sys.executable, "train.py", f"+experiment={e}", "--cfg", "job"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for e in EXPERIMENTS}
    jobs = {}
    try:
        for experiment, process in runs.items():
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, err[-2000:]
            jobs[experiment] = OmegaConf.create(out)
    finally:
        for process in runs.values():
            process.kill()  # no-op for a finished process
    return jobs


def global_batch(job) -> int:
    return job.data.batch_size * job.trainer.devices * job.trainer.num_nodes * job.trainer.accumulate_grad_batches


def check_one_gpu_qlora(job, r: int) -> None:
    """What both recipes share: one bf16 GPU, a 4-bit NF4 Mistral-7B with double quantisation and bf16
    compute, LoRA r = alpha on the seven linear layers, dropout 0.05, the handbook's lr used as it is."""
    assert (job.trainer.accelerator, job.trainer.devices, job.trainer.num_nodes) == ("gpu", 1, 1)
    assert job.trainer.precision == "bf16-mixed" and job.trainer.max_epochs == 1
    assert job.strategy._args_ == ["auto"]  # one device, no DeepSpeed (a 4-bit base cannot be built under ZeRO-3)
    assert job.model.dtype == "bfloat16" and job.model.gradient_checkpointing
    assert job.model.attn_implementation == "flash_attention_2"
    peft = job.peft
    assert (peft.method, peft.r, peft.alpha, peft.dropout, list(peft.target_modules)) == ("qlora", r, r, 0.05, LINEAR)
    assert (peft.quant_type, peft.double_quant, peft.compute_dtype, peft.lr_scale) == ("nf4", True, "bfloat16", 1.0)
    assert job.optim.weight_decay == 0.0 and job.optim.warmup_ratio == 0.1 and job.optim.scheduler == "cosine"
    assert job.data.bad_rows == "drop" and job.callbacks.checkpoint.every_n_train_steps == 100
    assert (job.callbacks.generations.num_prompts, job.callbacks.generations.max_new_tokens) == (8, 256)  # as the 7B
    # the parts that build on CPU: the adapter spec, bitsandbytes' loading config, the optimizer factory
    spec = instantiate(peft)
    assert spec.enabled and spec.quantized and spec.r == r
    assert learning_rate(job.optim.lr, spec, overrides=[]) == job.optim.lr  # lr_scale 1: not scaled again
    bnb = quantization_config(spec)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16


def test_cfg_job_of_the_qlora_dsft_recipe_is_the_handbooks(cfg_job):
    """sft/config_qlora.yaml: r 16, lr 2e-4, batch 4 x accumulation 2, max_seq_length 2048, AdamW."""
    job = cfg_job["zephyr-7b-beta-dsft-qlora"]
    check_one_gpu_qlora(job, r=16)
    assert job.model.name_or_path == "mistralai/Mistral-7B-v0.1"
    assert (job.data.path, job.data.train_split, job.data.test_split) == (
        "HuggingFaceH4/ultrachat_200k", "train_sft", "test_sft")
    assert (job.data.max_length, job.data.batch_size, job.data.eval_batch_size) == (2048, 4, 8)
    assert global_batch(job) == job.data.global_batch_size == 8 and job.trainer.accumulate_grad_batches == 2
    assert not job.data.packing and not job.data.assistant_only_loss  # TRL's SFTTrainer defaults
    assert job.optim.lr == 2e-4 and job.optim.optimizer._target_ == "torch.optim.AdamW"
    assert job.module._target_ == "zephyr_lit.modules.sft.SFTModule"
    optimizer = instantiate(job.optim.optimizer)([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], tuple(group["betas"]), group["eps"]) == (2e-4, 0.0, (0.9, 0.999), 1e-8)


def test_cfg_job_of_the_qlora_ddpo_recipe_is_the_handbooks_from_the_merged_dsft(cfg_job):
    """dpo/config_qlora.yaml: r 128, beta 0.01, lr 5e-6, batch 4 x accumulation 4, lengths 1024 / 512, paged AdamW
    32-bit, validation every 100 steps; the start (and so the reference) is the merged QLoRA dSFT export."""
    job = cfg_job["zephyr-7b-beta-ddpo-qlora"]
    check_one_gpu_qlora(job, r=128)
    assert job.model.name_or_path == "outputs/zephyr-7b-beta-dsft-qlora/latest/model"  # paths.root resolved
    assert not job.model.random_init
    assert job.module._target_ == "zephyr_lit.modules.dpo.DPOModule"
    assert (job.data.path, job.data.train_split, job.data.test_split) == (
        "HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "test_prefs")
    assert (job.data.max_length, job.data.max_prompt_length, job.data.batch_size) == (1024, 512, 4)
    assert global_batch(job) == job.data.global_batch_size == 16 and job.trainer.accumulate_grad_batches == 4
    assert job.trainer.val_check_interval == 100 * job.trainer.accumulate_grad_batches  # micro-batches
    dpo = instantiate(job.dpo)
    assert (dpo.beta, dpo.loss_type, dpo.ref.precompute, dpo.ref.sync_steps) == (0.01, "sigmoid", False, None)
    assert job.optim.lr == 5e-6
    factory = instantiate(job.optim.optimizer)
    from bitsandbytes.optim import PagedAdamW32bit

    assert factory.func is PagedAdamW32bit
    assert factory.keywords == {"lr": 5e-6, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8}


def test_the_recipes_compose_with_the_same_overrides_as_train(tmp_path):
    """The plain compose (as train.py) agrees with --cfg job on what the two recipes chain through."""
    dsft = compose_config(["+experiment=zephyr-7b-beta-dsft-qlora", f"paths.root={tmp_path}"])
    ddpo = compose_config(["+experiment=zephyr-7b-beta-ddpo-qlora", f"paths.root={tmp_path}"])
    assert ddpo.model.name_or_path == f"{tmp_path}/{dsft.experiment_name}/latest/model"


# ---- optim=paged_adamw_32bit: CUDA only --------------------------------------------------------------------------
def paged(*overrides: str):
    return compose_config(["+experiment=zephyr-7b-beta-ddpo-qlora", *overrides])


def test_the_paged_optimizer_is_refused_in_one_line_without_cuda(monkeypatch):
    monkeypatch.setattr(optimizers, "cuda_available", lambda: False)
    [problem] = optimizer_problems(paged())
    assert problem == ("optim.optimizer._target_=bitsandbytes.optim.PagedAdamW32bit: a bitsandbytes optimizer steps "
                       "on CUDA only (no CUDA device here); use optim=adamw here")
    [problem] = optimizer_problems(compose_config(["optim=paged_adamw_32bit"]))  # the embedded default: auto
    assert "(no CUDA device here)" in problem
    assert optimizer_problems(compose_config([])) == []  # optim=adamw runs anywhere


def test_the_paged_optimizer_is_accepted_on_a_gpu_only(monkeypatch):
    monkeypatch.setattr(optimizers, "cuda_available", lambda: True)
    assert optimizer_problems(paged()) == []
    assert optimizer_problems(compose_config(["optim=paged_adamw_32bit"])) == []  # auto picks the GPU
    [problem] = optimizer_problems(paged("trainer.accelerator=cpu"))
    assert "(trainer.accelerator=cpu)" in problem
    [problem] = optimizer_problems(compose_config(["optim=paged_adamw_32bit", "strategy=deepspeed_zero3_offload"]))
    assert "(DeepSpeed offloads the optimizer to cpu)" in problem


def test_the_config_check_reports_the_paged_optimizer_with_the_other_problems(monkeypatch, tmp_path):
    """``check_config`` lists it with every other problem, before anything loads."""
    from zephyr_lit.config import config_problems

    monkeypatch.setattr(optimizers, "cuda_available", lambda: False)
    problems = config_problems(paged(f"paths.root={tmp_path}", "model.attn_implementation=sdpa", "optim.lr=-1"))
    assert any(p.startswith("optim.lr=-1") for p in problems)
    assert any(p.startswith("optim.optimizer._target_=bitsandbytes.optim.PagedAdamW32bit") for p in problems)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_recipe_names_the_handbook_commit(experiment):
    text = (ROOT / "conf" / "experiment" / f"{experiment}.yaml").read_text()
    assert "925acdfe4b2b4e38c3dabd1851bc418f0b656351" in text
    assert f"recipes/zephyr-7b-beta/{'sft' if 'dsft' in experiment else 'dpo'}/config_qlora.yaml" in text


def test_the_paged_optimizer_without_bitsandbytes_names_the_extra(monkeypatch):
    real = optimizers.importlib.util.find_spec
    monkeypatch.setattr(optimizers.importlib.util, "find_spec",
                        lambda name, *args: None if name == "bitsandbytes" else real(name, *args))
    [problem] = optimizer_problems(paged())
    assert problem.endswith("needs the bitsandbytes package: pip install 'zephyr-lit[qlora]'")
