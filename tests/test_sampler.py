"""WindowBatchSampler: rank slices, accumulation windows and the window's label-token count."""

from zephyr_lit.data.sampler import WindowBatchSampler


def batches(sampler):
    return [list(b) for b in sampler]


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


def test_shuffle_is_seeded_and_changes_with_the_epoch_the_same_on_every_rank():
    counts = list(range(1, 33))
    a = WindowBatchSampler(counts, batch_size=4, world_size=2, rank=0, seed=7)
    b = WindowBatchSampler(counts, batch_size=4, world_size=2, rank=1, seed=7)
    first_a, first_b = batches(a), batches(b)
    seen = {i for batch in first_a + first_b for i, _ in batch}
    assert seen == set(range(32))  # the two ranks split one permutation, no overlap
    assert batches(WindowBatchSampler(counts, batch_size=4, world_size=2, rank=0, seed=7)) == first_a
    a.set_epoch(1)
    assert batches(a) != first_a
    for batch in first_a:  # accumulate=1: the window is one global micro-step (both ranks' rows)
        (tokens,) = {t for _, t in batch}
        assert tokens > sum(i + 1 for i, _ in batch)
