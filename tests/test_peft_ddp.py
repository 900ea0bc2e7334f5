"""LoRA under DDP: 2 CPU ranks (torchrun, gloo) train the adapter on the replicated base exactly as one
process with the same global batch, and their checkpoint holds the adapter alone.

Plain SGD without clipping (an update is ``lr x gradient``, so a gradient off by any factor shows) and
no adapter dropout (whose masks would differ between 2 ranks and 1 process)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import compose_config
from tests.distributed.train_py import max_abs_diff, train_py
from zephyr_lit.run import train

pytestmark = pytest.mark.slow

COMMON = [
    "+experiment=ddpo", "model.name_or_path=${asset:tiny-mistral}", "model.random_init=true", "peft=lora",
    "peft.dropout=0.0", "logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "trainer.gradient_clip_val=null", "optim.optimizer._target_=torch.optim.SGD", "~optim.optimizer.betas",
    "~optim.optimizer.eps", "optim.lr=0.5", "optim.scheduler=constant", "optim.warmup_ratio=0",
    "data.exact_match_path=null", "data.max_train_samples=32", "data.max_eval_samples=8", "data.max_length=64",
    "data.max_prompt_length=32",
    "trainer.max_steps=3",
]


def test_lora_dpo_on_two_ddp_ranks_trains_the_adapter_as_one_process_and_checkpoints_it_alone(tmp_path, hf_cache):
    paths = [f"paths.root={tmp_path}", f"data.cache_dir={hf_cache}"]
    code = train_py([*paths, *COMMON, f"paths.output_dir={tmp_path / 'two'}", "data.batch_size=2"],
                    tmp_path / "two.log", ranks=2)
    assert code == 0, (tmp_path / "two.log").read_text()[-4000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1): the same kernels, the same rounding
    try:
        train(compose_config([*paths, *COMMON, f"paths.output_dir={tmp_path / 'one'}", "data.batch_size=4"]),
              overrides=["optim.lr=0.5"], update_latest=False)
    finally:
        torch.set_num_threads(threads)

    two, one = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("two", "one"))
    diff = max_abs_diff(two, one)
    moved = max(float(one[k].abs().max()) for k in one if "lora_B" in k)  # B started at 0
    assert moved > 1e-2 and moved > 1000 * diff, (moved, diff)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["initial_metrics"]["val/rewards/margins"] == 0.0 and summary["global_step"] == 3
    state = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert len(state) == 56 and all("lora_" in key for key in state)
