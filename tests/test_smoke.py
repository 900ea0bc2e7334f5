"""``python -m zephyr_lit.smoke`` (a GPU check) composes on CPU: every stage's overrides are real
config keys, and the accumulation-window check reads a summary the way ``train`` writes it."""

import pytest

from tests.conftest import compose_config
from zephyr_lit.smoke import EDGE_STEPS, check_edges, edge_overrides, stage_overrides


@pytest.mark.parametrize("flash", [False, True])
def test_every_stage_composes(tmp_path, flash):
    stages = stage_overrides(str(tmp_path), steps=30, flash=flash)
    assert list(stages) == ["dsft", "ddpo", "edges"]
    for name, overrides in stages.items():
        cfg = compose_config([*overrides, *(edge_overrides([]) if name == "edges" else [])])
        assert cfg.strategy.config.zero_optimization.stage == 3 and cfg.trainer.precision == "bf16-mixed"
    edges = compose_config([*stages["edges"], *edge_overrides(["trainer.devices=2"])])
    # 5 micro-batches of 4 pairs per rank, accumulation 2, 2 epochs: 3 + 3 steps
    assert edges.data.max_train_samples == 4 * 5 * 2 and edges.trainer.accumulate_grad_batches == 2
    assert edges.trainer.max_epochs == 2 and edges.trainer.max_steps == -1 and EDGE_STEPS == 6
    assert edges.data.max_eval_samples % 2 == 1  # uneven validation on 2 ranks
    assert stages["dsft"].count("data.packing=true") == 1


def test_the_window_check_fails_when_a_short_window_did_not_step():
    assert "6 optimizer steps" in check_edges({"global_step": 6, "planned_steps": 6})
    with pytest.raises(AssertionError, match="short last window"):
        check_edges({"global_step": 4, "planned_steps": 6})
