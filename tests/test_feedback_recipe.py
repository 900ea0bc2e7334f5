"""AI feedback end to end on the embedded prompts: the scripted pool answers, the rule judge rates,
binarize pairs them, and dDPO (the shipped `+experiment=ddpo`, from the embedded dSFT export) learns
to rank held-out chosen answers above rejected ones (about 4 minutes)."""

from __future__ import annotations

import pytest

from tests.conftest import compose_config
from zephyr_lit.distill.app import distill
from zephyr_lit.run import train


@pytest.mark.slow
def test_completions_rate_binarize_then_ddpo_ranks_held_out_pairs(tmp_path, hf_cache):
    feedback = tmp_path / "feedback"
    made = distill(compose_config(["+pipeline=feedback", f"output_dir={feedback}", f"cache_dir={hf_cache}"], "distill"))
    assert made["completions"]["failed"] == 0 and made["rate"]["unrated"] == 0
    assert made["binarize"]["pairs"] == 900 and made["binarize"]["test"] == 100

    common = [f"paths.root={tmp_path}", f"data.cache_dir={hf_cache}", "logger=csv", "trainer.enable_progress_bar=false"]
    train(compose_config(["+experiment=dsft", *common]))
    ddpo = train(compose_config(["+experiment=ddpo", f"data.path={feedback / 'prefs'}", *common]))
    assert ddpo["initial_metrics"]["val/rewards/accuracies"] == 0.0  # policy == reference before step 1
    assert ddpo["metrics"]["val/rewards/accuracies"] >= 0.8
    assert ddpo["metrics"]["val/rewards/margins"] > 0
