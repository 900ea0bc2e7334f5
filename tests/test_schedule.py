import math

import pytest
import torch

from zephyr_lit.schedule import build_scheduler, lr_multiplier


def test_warmup_then_cosine_by_hand():
    # total 10 steps, 2 warmup: multipliers 1/2, 2/2, then 0.5 * (1 + cos(pi * (s - 2) / 8))
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert [lr_multiplier(s, 10, 2, "cosine") for s in range(10)] == pytest.approx(expected)
    assert lr_multiplier(6, 10, 2, "cosine") == pytest.approx(0.5)  # half way through the decay


def test_linear_and_constant():
    assert [lr_multiplier(s, 5, 1, "linear") for s in range(5)] == pytest.approx([1.0, 1.0, 0.75, 0.5, 0.25])
    assert [lr_multiplier(s, 5, 1, "constant") for s in range(5)] == [1.0] * 5


def test_scheduler_drives_the_optimizer_lr():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = build_scheduler(optimizer, "linear", total_steps=10, warmup_ratio=0.2)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.0875])


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        lr_multiplier(5, 10, 0, "step")
