"""The training data's position and the RNG states that a checkpoint carries (no training here)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from zephyr_lit.data.position import ResumableLoader
from zephyr_lit.data.sampler import WindowBatchSampler
from zephyr_lit.errors import ConfigError
from zephyr_lit.resume import rng_state, set_rng_state


class Indices(torch.utils.data.Dataset):
    """Each sampler key ``(index, window_tokens, window_rows)`` as its row index."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, key: tuple[int, int, int]) -> int:
        return key[0]


def loader(batch_size: int = 2, accumulate: int = 2, rows: int = 20, **kwargs) -> ResumableLoader:
    sampler = WindowBatchSampler([1] * rows, batch_size, accumulate, seed=3, **kwargs)
    return ResumableLoader(Indices(), batch_sampler=sampler, collate_fn=list)


def test_a_restored_position_continues_with_the_next_micro_batch_of_that_epoch():
    whole = loader()
    whole.batch_sampler.set_epoch(1)
    expected = list(whole)  # 10 micro-batches of 2 row indices
    part = loader()
    part.batch_sampler.set_epoch(1)
    seen = []
    for batch in part:
        seen.append(batch)
        if len(seen) == 4:
            break
    state = part.state_dict()
    assert state["micro_batches"] == 4 and state["epoch"] == 1

    resumed = loader()
    iterator = iter(resumed)  # Lightning calls iter() before the checkpoint is restored: iteration is lazy
    resumed.load_state_dict(state)
    resumed.batch_sampler.set_epoch(1)
    rest = list(iterator)
    assert seen + rest == expected
    assert resumed.state_dict()["micro_batches"] == 10
    assert len(list(resumed)) == 10  # the next iteration starts at the beginning again


def test_the_window_token_counts_after_a_resume_are_those_of_the_whole_window():
    counts = list(range(1, 21))
    sampler = WindowBatchSampler(counts, 2, 3, seed=0)
    full = list(sampler)
    sampler.start_at(4)
    assert list(sampler) == full[4:]  # (index, window_tokens, window_rows) unchanged, window 2 started at 3


def test_a_position_saved_in_another_epoch_is_not_applied():
    part = loader()
    state = dict(part.state_dict(), micro_batches=6)  # epoch 0
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.batch_sampler.set_epoch(1)  # the checkpoint closed epoch 0: epoch 1 starts at its beginning
    assert len(list(resumed)) == 10


def test_a_position_from_another_batch_geometry_is_refused_in_one_line():
    state = loader(batch_size=2).state_dict()
    with pytest.raises(ConfigError, match=r"batch_size 2 -> 4.*data.batch_size") as error:
        loader(batch_size=4).load_state_dict(state)
    assert "\n" not in str(error.value)


def test_rng_states_survive_a_weights_only_checkpoint_round_trip():
    torch.manual_seed(0)
    state = rng_state()
    drawn = (torch.rand(3), float(np.random.rand()), random.random())
    buffer = io.BytesIO()
    torch.save({"rng": [state]}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["rng"][0]  # Lightning loads checkpoints weights_only
    torch.rand(5), np.random.rand(7), random.random()  # move every generator on
    set_rng_state(loaded)
    again = (torch.rand(3), float(np.random.rand()), random.random())
    assert torch.equal(drawn[0], again[0]) and drawn[1:] == again[1:]
