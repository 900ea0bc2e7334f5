"""WindowBatchSampler: rank slices, accumulation windows, the window's label-token count, and length
grouping (``data.group_by_length``) down to the data modules and the config."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from zephyr_lit.assets import TINY_MODEL, asset_path
from zephyr_lit.data.collate import padded_length
from zephyr_lit.data.sampler import WindowBatchSampler
from zephyr_lit.models import ModelSpec, load_tokenizer
from tests.conftest import compose_config


def batches(sampler):
    """``[(index, window_tokens), ...]`` per micro-batch (``window_rows`` is checked on its own)."""
    return [[(i, tokens) for i, tokens, _ in b] for b in sampler]


def test_two_ranks_two_accumulation_steps_share_the_window_count():
    counts = [1, 2, 3, 4, 5, 6, 7, 8]
    # global micro-step 0 = examples 0..3 (rank 0 takes 0,1; rank 1 takes 2,3), step 1 = 4..7;
    # both steps form one window of 1+2+...+8 = 36 label tokens.
    rank0 = WindowBatchSampler(counts, batch_size=2, accumulate=2, world_size=2, rank=0, shuffle=False)
    rank1 = WindowBatchSampler(counts, batch_size=2, accumulate=2, world_size=2, rank=1, shuffle=False)
    assert batches(rank0) == [[(0, 36), (1, 36)], [(4, 36), (5, 36)]]
    assert batches(rank1) == [[(2, 36), (3, 36)], [(6, 36), (7, 36)]]
    assert len(rank0) == len(rank1) == 2


def test_last_window_may_be_short_and_incomplete_micro_steps_are_dropped():
    counts = [1] * 8 + [10, 20, 30, 40] + [100]  # 13 rows, batch 2 x 2 ranks -> 3 micro-steps, row 12 dropped
    sampler = WindowBatchSampler(counts, batch_size=2, accumulate=2, world_size=2, rank=0, shuffle=False)
    assert batches(sampler) == [[(0, 8), (1, 8)], [(4, 8), (5, 8)], [(8, 100), (9, 100)]]


def test_every_micro_batch_carries_its_windows_row_count_short_last_window_included():
    # 5 global micro-steps of 2 x 2 ranks, accumulate 2: windows of 2, 2 and 1 micro-steps = 8, 8, 4 rows
    counts = list(range(20))
    sampler = WindowBatchSampler(counts, batch_size=2, accumulate=2, world_size=2, rank=1, shuffle=False)
    keys = list(sampler)
    assert [[i for i, *_ in batch] for batch in keys] == [[2, 3], [6, 7], [10, 11], [14, 15], [18, 19]]
    assert [{rows for *_, rows in batch} for batch in keys] == [{8}, {8}, {8}, {8}, {4}]
    # the short window's tokens are its own rows' counts: 16 + 17 + 18 + 19
    assert {tokens for _, tokens, _ in keys[-1]} == {16 + 17 + 18 + 19}


def test_shuffle_is_seeded_and_changes_with_the_epoch_the_same_on_every_rank():
    counts = list(range(1, 33))
    a = WindowBatchSampler(counts, batch_size=4, world_size=2, rank=0, seed=7)
    b = WindowBatchSampler(counts, batch_size=4, world_size=2, rank=1, seed=7)
    first_a, first_b = batches(a), batches(b)
    seen = {i for batch in first_a + first_b for i, *_ in batch}
    assert seen == set(range(32))  # the two ranks split one permutation, no overlap
    assert batches(WindowBatchSampler(counts, batch_size=4, world_size=2, rank=0, seed=7)) == first_a
    a.set_epoch(1)
    assert batches(a) != first_a
    for batch in first_a:  # accumulate=1: the window is one global micro-step (both ranks' rows)
        (tokens,) = {t for _, t in batch}
        assert tokens > sum(i + 1 for i, *_ in batch)


# ---- length grouping -------------------------------------------------------------------------
def indices(sampler):
    return [[i for i, *_ in batch] for batch in sampler]


def padded_tokens(batches_, lengths, batch_size):
    """What the batches cost once padded: ``sum(batch_size * longest row)``."""
    return sum(batch_size * max(lengths[i] for i in batch) for batch in batches_)


LENGTHS = [1, 8, 2, 7, 3, 6, 4, 5]


def test_grouping_sorts_each_mega_chunk_and_pads_less_by_hand():
    # shuffle=False: chunks of 2 micro-steps x 2 rows in dataset order. Chunk 0 = rows 0..3, lengths
    # 1, 8, 2, 7 -> sorted 1(8) 3(7) 2(2) 0(1) -> batches [1, 3], [2, 0]; chunk 1 = rows 4..7, lengths
    # 3, 6, 4, 5 -> 5(6) 7(5) 6(4) 4(3) -> [5, 7], [6, 4].
    plain = WindowBatchSampler([1] * 8, batch_size=2, shuffle=False)
    grouped = WindowBatchSampler([1] * 8, batch_size=2, shuffle=False, lengths=LENGTHS, mega_batches=2)
    assert indices(plain) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert indices(grouped) == [[1, 3], [2, 0], [5, 7], [6, 4]]
    assert padded_tokens(indices(plain), LENGTHS, 2) == 2 * (8 + 7 + 6 + 5) == 52
    assert padded_tokens(indices(grouped), LENGTHS, 2) == 2 * (8 + 2 + 6 + 4) == 40  # 36 real tokens


def test_the_longest_batch_comes_first_even_unshuffled():
    # Chunk 0 = rows 0..3 -> [3, 2], [1, 0]; chunk 1 (rows 4..7, lengths 9, 5, 6, 7) -> [4, 7], [6, 5],
    # and [4, 7] holds the epoch's longest row: it goes first, the others keep their order.
    lengths = [1, 2, 3, 4, 9, 5, 6, 7]
    grouped = WindowBatchSampler([1] * 8, batch_size=2, shuffle=False, lengths=lengths, mega_batches=2)
    assert indices(grouped) == [[4, 7], [3, 2], [1, 0], [6, 5]]


def test_shuffled_grouping_longest_first_and_each_micro_step_contiguous_in_its_chunk():
    lengths = [(i * 37) % 101 for i in range(96)]  # distinct, scrambled
    for seed, epoch in [(0, 0), (1, 0), (1, 3), (5, 2)]:
        # one chunk (16 global micro-steps of 6 rows): the first holds the epoch's 6 longest rows
        whole = WindowBatchSampler([1] * 96, batch_size=3, world_size=2, seed=seed, lengths=lengths, mega_batches=16)
        whole.set_epoch(epoch)
        first = whole.global_steps()[0].flatten().tolist()
        assert sorted(lengths[i] for i in first) == sorted(lengths)[-6:]
        # chunks of 4 global micro-steps: the chunk's rows are the permutation's (the seed + epoch draw,
        # as without grouping); each micro-step is a contiguous run of the chunk sorted longest first
        sampler = WindowBatchSampler([1] * 96, batch_size=3, world_size=2, seed=seed, lengths=lengths, mega_batches=4)
        sampler.set_epoch(epoch)
        permutation = torch.randperm(96, generator=torch.Generator().manual_seed(seed + epoch))
        runs = set()
        for chunk in permutation.view(4, 24).tolist():
            ranked = sorted(chunk, key=lambda i: -lengths[i])
            runs |= {tuple(ranked[k : k + 6]) for k in range(0, 24, 6)}
        steps = [tuple(step.flatten().tolist()) for step in sampler.global_steps()]
        assert set(steps) == runs
        assert lengths[steps[0][0]] == max(lengths)
        plain = WindowBatchSampler([1] * 96, batch_size=6, seed=seed)
        plain.set_epoch(epoch)
        assert padded_tokens(steps, lengths, 6) < padded_tokens(indices(plain), lengths, 6)


def test_grouped_epoch_covers_every_row_once_across_ranks_minus_the_tail():
    lengths = [(i * 13) % 29 for i in range(37)]  # 37 rows, 3 x 2 per global micro-step: 6 steps, 1 row dropped
    ranks = [WindowBatchSampler([1] * 37, batch_size=3, world_size=2, rank=r, seed=3, lengths=lengths, mega_batches=2)
             for r in range(2)]
    seen = [i for sampler in ranks for batch in indices(sampler) for i in batch]
    assert len(seen) == len(set(seen)) == 36 and set(seen) <= set(range(37))
    assert [len(sampler) for sampler in ranks] == [len(indices(sampler)) for sampler in ranks] == [6, 6]


def test_two_ranks_take_disjoint_slices_of_the_same_grouped_micro_steps():
    lengths = [(i * 7) % 41 for i in range(40)]
    ranks = [WindowBatchSampler(list(range(40)), batch_size=4, accumulate=2, world_size=2, rank=r, seed=9,
                                lengths=lengths, mega_batches=2) for r in range(2)]
    steps = ranks[0].global_steps()
    assert torch.equal(steps, ranks[1].global_steps())  # the same order on every rank
    got = [list(sampler) for sampler in ranks]
    for s, (batch0, batch1) in enumerate(zip(*got)):
        rows0, rows1 = [i for i, *_ in batch0], [i for i, *_ in batch1]
        assert rows0 == steps[s, 0].tolist() and rows1 == steps[s, 1].tolist() and not set(rows0) & set(rows1)
        assert min(lengths[i] for i in rows0) >= max(lengths[i] for i in rows1)  # rank 0 holds the longer half
        assert {t for _, t, _ in batch0} == {t for _, t, _ in batch1}  # one window count on both ranks


def test_grouped_window_token_counts_by_hand():
    # one chunk (mega_batches=4), all 8 rows sorted longest first: 1(8) 3(7) 5(6) 7(5) 6(4) 4(3) 2(2) 0(1)
    # -> global micro-steps [1, 3], [5, 7], [6, 4], [2, 0]; windows of 2: rows {1, 3, 5, 7} and {6, 4, 2, 0}
    counts = [10, 20, 30, 40, 50, 60, 70, 80]
    window0, window1 = 20 + 40 + 60 + 80, 70 + 50 + 30 + 10
    assert (window0, window1) == (200, 160)
    rank0, rank1 = [WindowBatchSampler(counts, batch_size=1, accumulate=2, world_size=2, rank=r, shuffle=False,
                                       lengths=LENGTHS, mega_batches=4) for r in range(2)]
    assert batches(rank0) == [[(1, 200)], [(5, 200)], [(6, 160)], [(2, 160)]]
    assert batches(rank1) == [[(3, 200)], [(7, 200)], [(4, 160)], [(0, 160)]]
    # shuffled: each window's count is the sum over the rows of its 2 consecutive global micro-steps
    counts = list(range(1, 41))
    sampler = WindowBatchSampler(counts, batch_size=2, accumulate=2, world_size=2, seed=4,
                                 lengths=[(i * 7) % 41 for i in range(40)], mega_batches=3)
    steps = sampler.global_steps()
    expected = [sum(counts[i] for i in steps[s - s % 2 : s - s % 2 + 2].flatten().tolist()) for s in range(len(steps))]
    assert [batch[0][1] for batch in sampler] == expected


def test_grouped_order_changes_with_the_epoch_and_is_deterministic_per_seed():
    lengths = [(i * 37) % 101 for i in range(96)]
    make = lambda seed: WindowBatchSampler([1] * 96, batch_size=4, seed=seed, lengths=lengths, mega_batches=3)  # noqa: E731
    first = indices(make(7))
    assert indices(make(7)) == first and indices(make(8)) != first
    sampler = make(7)
    sampler.set_epoch(1)
    second = indices(sampler)
    assert second != first and sorted(map(sorted, second)) != sorted(map(sorted, first))  # new batches, not just reordered
    sampler.set_epoch(0)
    assert indices(sampler) == first


def test_grouping_arguments_are_checked():
    with pytest.raises(ValueError, match="3 lengths for 4 rows"):
        WindowBatchSampler([1] * 4, batch_size=2, lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="mega_batches=0"):
        WindowBatchSampler([1] * 4, batch_size=2, lengths=[1, 2, 3, 4], mega_batches=0)
    from zephyr_lit.config import config_problems

    for experiment in ("dsft", "ddpo"):
        cfg = compose_config([f"+experiment={experiment}", "model.name_or_path=${asset:tiny-mistral}",
                              "data.group_by_length=true", "data.group_mega_batches=0"])
        assert "data.group_mega_batches=0: must be >= 1" in config_problems(cfg)


# ---- the data modules and the config -----------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSpec(name_or_path=asset_path(TINY_MODEL)))


def row_length(row: dict) -> int:
    if "input_ids" in row:
        return len(row["input_ids"])
    return row["prompt_length"] + max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))


@pytest.mark.parametrize("overrides", [["data=ultrafeedback_tiny"], ["data=ultrachat_tiny"],
                                       ["data=ultrachat_tiny", "data.packing=true"]])
def test_grouped_data_module_starts_with_the_epochs_longest_rows(overrides, hf_cache, tokenizer):
    default = compose_config(overrides).data
    assert (default.group_by_length, default.group_mega_batches) == (False, 50)
    cfg = compose_config([*overrides, f"data.cache_dir={hf_cache}", "data.group_by_length=true",
                          "data.group_mega_batches=1000"])  # one chunk: the whole epoch
    datamodule = instantiate(cfg.data)
    datamodule.prepare(tokenizer)
    lengths = datamodule.train_lengths()
    assert lengths == [row_length(row) for row in datamodule.train_set]
    loader = datamodule.train_dataloader()
    steps = loader.batch_sampler.global_steps().flatten(1).tolist()
    kept = sorted(lengths[i] for step in steps for i in step)
    first = [i for i, *_ in next(iter(loader.batch_sampler))]
    assert sorted(lengths[i] for i in first) == kept[-datamodule.batch_size:]  # the epoch's longest rows
    batch = next(iter(loader))
    assert batch["input_ids"].shape[1] == padded_length(max(lengths), datamodule.pad_to_multiple_of)
    plain = WindowBatchSampler(datamodule.train_counts(), datamodule.batch_size, seed=datamodule.seed)
    assert padded_tokens(steps, lengths, datamodule.batch_size) < padded_tokens(indices(plain), lengths, datamodule.batch_size)


def test_cfg_job_shows_the_grouping_keys():
    result = subprocess.run([sys.executable, "train.py", "+experiment=dsft", "data.group_by_length=true", "--cfg", "job"],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    job = OmegaConf.create(result.stdout)
    assert job.data.group_by_length is True and job.data.group_mega_batches == 50
    ddpo = compose_config(["+experiment=ddpo", "data.group_by_length=true", "data.group_mega_batches=8"])
    assert instantiate(ddpo.data).group_mega_batches == 8 and ddpo.data.group_by_length
