"""Killed with SIGKILL after a mid-epoch checkpoint and resumed with ``ckpt_path=last``, a run ends with
the weights of the same run never interrupted (<= 1e-6; on one machine they are bit-identical).

Every run is ``python train.py ...`` (or ``torchrun ... train.py``) in its own process group with a
deadline. The killed run dies at the start of its second micro-batch after the checkpoint
(``tests/resume/kill.py``), so work past the checkpoint is lost and must be redone from the same data
and the same random state. An epoch is far longer than the run, so every checkpoint is mid-epoch;
a resumed run that restarted the epoch's data order (or drew other dropout masks) would end elsewhere:
the first test checks that the uninterrupted run moved the weights by much more than the tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.train_py import max_abs_diff, train_py, weights
from zephyr_lit.assets import TINY_MODEL, asset_path

pytestmark = pytest.mark.slow

TOL = 1e-6
KILL = "tests.resume.kill.KillAfter"

COMMON = [
    "logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "data.exact_match_path=null", "data.max_eval_samples=16", "trainer.max_steps=9", "trainer.max_epochs=1",
    "callbacks.checkpoint.every_n_train_steps=3", "trainer.log_every_n_steps=1",
]
SFT = ["+experiment=dsft", "data.max_train_samples=256", "data.batch_size=8", "data.max_length=128"]
DPO = ["+experiment=ddpo", f"model.name_or_path={asset_path(TINY_MODEL)}", "model.random_init=true",
       "data.max_train_samples=128", "data.batch_size=4", "data.max_prompt_length=64", "data.max_length=128",
       "optim.lr=1e-3"]


def killed_and_resumed(tmp_path: Path, hf_cache: Path, case: list[str], kills: tuple[int, ...] = (3,),
                       ranks: int = 1) -> float:
    """Max abs weight difference between the uninterrupted run and the one killed after each step of
    ``kills`` (each time resumed with ``ckpt_path=last``)."""
    shared = [f"paths.root={tmp_path / 'outputs'}", f"data.cache_dir={hf_cache}", *COMMON, *case]
    log = tmp_path / "runs.log"

    def run(out: Path, *extra: str) -> int:
        return train_py([*shared, f"paths.output_dir={out}", *extra], log, ranks)

    assert run(tmp_path / "whole") == 0, log.read_text()[-5000:]
    resumed = tmp_path / "resumed"
    for i, step in enumerate(kills):
        code = run(resumed, *(["ckpt_path=last"] if i else []), f"+callbacks.kill._target_={KILL}",
                   f"+callbacks.kill.step={step}")
        assert code != 0, f"the run meant to be killed after step {step} ended by itself"
        checkpoint = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert checkpoint["global_step"] == step
        position = checkpoint["zephyr_resume"]["data"]
        assert position["micro_batches"] == step * position["accumulate"]  # mid-epoch, at a window's end
        assert not (resumed / "model").exists()
    assert run(resumed, "ckpt_path=last") == 0, log.read_text()[-5000:]
    diff = max_abs_diff(weights(resumed), weights(tmp_path / "whole"))
    print(f"\n{case} kills={kills} ranks={ranks}: max |resumed - whole| = {diff:.3g}")
    return diff


def test_dsft_padded_resumes_mid_epoch_to_the_same_weights(tmp_path, hf_cache):
    shared = [f"paths.root={tmp_path / 'outputs'}", f"data.cache_dir={hf_cache}", *COMMON, *SFT]
    # the weights move by far more than the tolerance: a wrong resume cannot hide in it
    assert train_py([*shared, f"paths.output_dir={tmp_path / 'zero'}", "optim.lr=1e-12"], tmp_path / "z.log") == 0
    assert killed_and_resumed(tmp_path, hf_cache, SFT) <= TOL
    assert max_abs_diff(weights(tmp_path / "whole"), weights(tmp_path / "zero")) > 1e-3


def test_dsft_packed_resumes_mid_epoch_to_the_same_weights(tmp_path, hf_cache):
    assert killed_and_resumed(tmp_path, hf_cache, [*SFT, "data.packing=true"]) <= TOL


def test_ddpo_online_resumes_mid_epoch_to_the_same_weights(tmp_path, hf_cache):
    assert killed_and_resumed(tmp_path, hf_cache, DPO) <= TOL


def test_ddpo_with_precomputed_reference_resumes_mid_epoch_to_the_same_weights(tmp_path, hf_cache):
    case = [*DPO, "dpo.ref.precompute=true", f"dpo.ref.cache_dir={tmp_path / 'ref-cache'}"]
    assert killed_and_resumed(tmp_path, hf_cache, case) <= TOL


def test_accumulation_and_length_grouping_resume_mid_epoch_to_the_same_weights(tmp_path, hf_cache):
    case = [*SFT, "trainer.accumulate_grad_batches=2", "data.batch_size=4", "data.group_by_length=true",
            "data.group_mega_batches=4"]
    # killed again one micro-batch into the resumed run: a checkpoint written there (mid-window) would show
    assert killed_and_resumed(tmp_path, hf_cache, case, kills=(3, 3)) <= TOL


def test_attention_dropout_resumes_with_the_same_masks(tmp_path, hf_cache):
    case = [*SFT, "+model.config_overrides.attention_dropout=0.2"]
    assert killed_and_resumed(tmp_path, hf_cache, case) <= TOL


def test_two_ddp_ranks_resume_mid_epoch_to_the_same_weights(tmp_path, hf_cache):
    case = [*DPO, "+model.config_overrides.attention_dropout=0.1"]
    assert killed_and_resumed(tmp_path, hf_cache, case, ranks=2) <= TOL


def test_two_kills_within_one_epoch_resume_to_the_same_weights(tmp_path, hf_cache):
    assert killed_and_resumed(tmp_path, hf_cache, SFT, kills=(3, 6)) <= TOL
