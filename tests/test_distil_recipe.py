"""The whole recipe on the embedded default, from seed questions to an aligned model: ``+pipeline=embedded``
(scripted user and teacher write dialogues, the scripted pool answers their prompts, the rule judge
rates, binarize pairs), then the shipped ``+experiment=dsft`` on ``sft/`` and ``+experiment=ddpo`` from that
export on ``prefs/`` (several minutes on 2 CPU cores)."""

from __future__ import annotations

import pytest

from tests.conftest import compose_config
from zephyr_lit.distill.app import distill
from zephyr_lit.run import train


@pytest.mark.slow
def test_the_embedded_pipeline_trains_a_dsft_model_and_ddpo_ranks_its_held_out_pairs(tmp_path, hf_cache):
    data = tmp_path / "distilled"
    made = distill(compose_config(["+pipeline=embedded", f"output_dir={data}", f"cache_dir={hf_cache}"], "distill"))
    assert made["dialogues"]["dropped"] == 0 and made["completions"]["failed"] == 0 and made["rate"]["unrated"] == 0
    assert made["dialogues"]["turns"] > made["dialogues"]["dialogues"]  # multi-round dialogues among them
    assert made["binarize"]["test"] == 100

    common = [f"paths.root={tmp_path}", f"data.cache_dir={hf_cache}", "logger=csv", "trainer.enable_progress_bar=false"]
    dsft = train(compose_config(["+experiment=dsft", f"data.path={data / 'sft'}", *common]))
    assert dsft["metrics"]["val/loss"] <= dsft["initial_metrics"]["val/loss"] / 2  # at least halved
    export = tmp_path / "dsft" / "latest" / "model"
    assert export.is_dir()
    ddpo = train(compose_config(["+experiment=ddpo", f"model.name_or_path={export}", f"data.path={data / 'prefs'}", *common]))
    assert ddpo["initial_metrics"]["val/rewards/accuracies"] == 0.0  # policy == reference before step 1
    assert ddpo["metrics"]["val/rewards/accuracies"] >= 0.8
    assert ddpo["metrics"]["val/rewards/margins"] > 0
