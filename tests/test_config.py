"""Every config group composes; everything that can be built on CPU without the hub instantiates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, compose_config

GROUPS = ["model", "data", "module", "optim", "strategy", "trainer", "logger", "callbacks", "paths"]
# Need the hub or GPUs: compose and resolve only.
COMPOSE_ONLY = {("model", "mistral-7b"), ("data", "ultrachat_200k"), ("data", "ultrafeedback_binarized"),
                ("trainer", "gpu_2x8")}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_builds(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}", f"paths.root={tmp_path}", f"paths.output_dir={tmp_path / 'run'}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    if (group, option) in COMPOSE_ONLY or group in ("paths", "module"):
        return
    node = cfg[group]
    built = [instantiate(v) for v in node.values()] if group in ("logger", "callbacks") else instantiate(node)
    assert built is not None


def test_bare_config_is_the_embedded_dsft(tmp_path):
    bare = compose_config([f"paths.output_dir={tmp_path}"])
    dsft = compose_config(["+experiment=dsft", f"paths.output_dir={tmp_path}"])
    assert bare.experiment_name == dsft.experiment_name == "dsft"
    assert bare.model.random_init and "tiny-mistral" in bare.model.name_or_path
    assert bare.data.train_split == "train_sft"


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")))
def test_experiments_are_global_packages_that_open_with_their_command(experiment):
    text = (Path(CONF_DIR) / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert f"python train.py +experiment={experiment}" in text.splitlines()[1]
    compose_config([f"+experiment={experiment}"])


def test_public_override_keys_exist():
    cfg = compose_config([])
    for key in ["model.name_or_path", "model.attn_implementation", "data.path", "data.max_length",
                "data.batch_size", "data.train_split", "data.test_split", "optim.lr", "optim.weight_decay",
                "optim.warmup_ratio", "optim.scheduler", "trainer.max_epochs", "trainer.max_steps",
                "trainer.accumulate_grad_batches", "seed", "paths.root", "paths.output_dir"]:
        assert OmegaConf.select(cfg, key, throw_on_missing=False) is not None or key == "paths.output_dir", key
    assert cfg.paths.root == "outputs"
    assert cfg.optim.weight_decay == 0.0 and cfg.trainer.gradient_clip_val == 1.0


def test_default_output_dir_is_root_experiment_timestamp():
    cfg = compose_config(["paths.root=/somewhere"])
    parts = Path(cfg.paths.output_dir).parts
    assert parts[:3] == ("/", "somewhere", "dsft") and len(parts) == 4


def test_wandb_is_offline_by_default_and_holds_no_key():
    cfg = compose_config([])
    assert cfg.logger.wandb.offline is True
    assert "api_key" not in OmegaConf.to_yaml(cfg).lower()


def global_batch(cfg) -> int:
    """Per-device batch x devices x nodes x accumulation, as the trainer will run it."""
    return cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes * cfg.trainer.accumulate_grad_batches


def test_zephyr_7b_beta_recipes_derive_the_papers_global_batches():
    dsft = compose_config(["+experiment=zephyr-7b-beta-dsft"])
    ddpo = compose_config(["+experiment=zephyr-7b-beta-ddpo"])
    assert global_batch(dsft) == dsft.data.global_batch_size == 512
    assert global_batch(ddpo) == ddpo.data.global_batch_size == 32
    assert (dsft.trainer.devices, dsft.trainer.num_nodes, dsft.trainer.precision) == (8, 2, "bf16-mixed")
    assert dsft.data.packing and not dsft.data.assistant_only_loss and dsft.data.max_length == 2048
    assert (ddpo.dpo.beta, ddpo.optim.lr, ddpo.optim.scheduler, ddpo.trainer.max_epochs) == (0.1, 5e-7, "linear", 3)
    assert (ddpo.data.max_length, ddpo.data.max_prompt_length) == (1024, 512)
    assert ddpo.model.name_or_path.endswith("zephyr-7b-beta-dsft/latest/model")
    assert not ddpo.model.random_init and "tiny" not in ddpo.model.name_or_path
    assert (dsft.callbacks.checkpoint.every_n_train_steps, ddpo.callbacks.checkpoint.every_n_train_steps) == (50, 200)
    for cfg in (dsft, ddpo):
        assert cfg.callbacks.exact_resume._target_ == "zephyr_lit.resume.ExactResume"
        assert cfg.optim.weight_decay == 0.0 and cfg.model.dtype == "bfloat16"
        assert cfg.model.attn_implementation == "flash_attention_2" and cfg.model.gradient_checkpointing
        zero = cfg.strategy.config.zero_optimization
        assert zero.stage == 3 and "offload_param" not in zero and "offload_optimizer" not in zero
        assert cfg.strategy.exclude_frozen_parameters


@pytest.mark.parametrize("experiment", ["zephyr-7b-beta-dsft", "zephyr-7b-beta-ddpo"])
def test_cfg_job_of_the_7b_recipes_shows_zero3_bf16_two_nodes_of_eight(experiment):
    """What ``python train.py +experiment=... --cfg job`` prints, and the strategy it instantiates."""
    result = subprocess.run([sys.executable, "train.py", f"+experiment={experiment}", "--cfg", "job"],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    job = OmegaConf.create(result.stdout)
    assert job.strategy._target_ == "zephyr_lit.checkpointing.DeepSpeedStrategy"  # Lightning's, saving atomically
    assert job.strategy.config.zero_optimization.stage == 3
    assert (job.trainer.precision, job.trainer.devices, job.trainer.num_nodes) == ("bf16-mixed", 8, 2)
    assert job.model.attn_implementation == "flash_attention_2" and job.model.dtype == "bfloat16"
    assert job.data.global_batch_size == global_batch(job) == (512 if experiment.endswith("dsft") else 32)
    strategy = instantiate(job.strategy)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.zero_stage_3 and strategy.exclude_frozen_parameters and isinstance(strategy.config, dict)


def test_offload_variant_offloads_params_and_optimizer_to_cpu():
    zero = compose_config(["strategy=deepspeed_zero3_offload"]).strategy.config.zero_optimization
    assert zero.stage == 3 and zero.offload_param.device == zero.offload_optimizer.device == "cpu"


def test_five_bad_values_get_one_message_before_any_data_or_model(make_cfg, monkeypatch):
    """Values once checked one at a time while objects were built now all fail together, first."""
    from zephyr_lit import run
    from zephyr_lit.errors import ConfigError

    def loaded(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the config check")

    monkeypatch.setattr(run, "load_tokenizer", loaded)
    cfg = make_cfg("+experiment=ddpo", "model.name_or_path=${asset:tiny-mistral}", "model.random_init=true",
                   "data.group_mega_batches=0", "data.max_prompt_length=300", "module.length_groups=0",
                   "module.exact_match_batch_size=0", "module.nonfinite=maybe")
    with pytest.raises(ConfigError) as error:
        run.train(cfg)
    message = str(error.value)
    assert "\n" not in message
    for bad in ("data.group_mega_batches=0", "data.max_prompt_length=300: must be < data.max_length=256",
                "module.length_groups=0", "module.exact_match_batch_size=0", "module.nonfinite=maybe"):
        assert bad in message
