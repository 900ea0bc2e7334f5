"""Equal rank shards for validation (padding that counts in no metric) and the sums behind every mean."""

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from zephyr_lit.data.base import EqualShard, ShardedDataModule
from zephyr_lit.data.sft import SFTDataModule
from zephyr_lit.data.tokenize import IGNORE_INDEX
from zephyr_lit.evaluation import rank_slice
from zephyr_lit.metric_sums import MetricSums

ROWS = [{"input_ids": [1, i], "labels": [IGNORE_INDEX, i]} for i in range(7)]


def test_seven_rows_on_two_ranks_are_two_blocks_of_four_the_last_padded():
    shards = [EqualShard(ROWS, 2, rank, ShardedDataModule.uncounted) for rank in range(2)]
    assert [len(s) for s in shards] == [4, 4]
    assert shards[0].real_indices == [0, 1, 2, 3] and shards[1].real_indices == [4, 5, 6]
    assert [s[i]["input_ids"][1] for s in shards for i in range(4)] == [0, 1, 2, 3, 4, 5, 6, 0]
    assert "counted" not in shards[1][2] and shards[1][3]["counted"] is False
    # three rows on four ranks: rank 3 holds padding only, and still one row
    assert [len(EqualShard(ROWS[:3], 4, r, dict)) for r in range(4)] == [1, 1, 1, 1]
    assert EqualShard(ROWS[:3], 4, 3, dict).real_indices == []


def test_an_sft_padding_row_has_no_label_and_a_preference_pad_is_marked():
    pad = SFTDataModule.uncounted(ROWS[5])
    assert pad["input_ids"] == [1, 5] and pad["labels"] == [IGNORE_INDEX, IGNORE_INDEX]
    assert ShardedDataModule.uncounted({"index": 3})["counted"] is False


def test_exact_match_slices_have_the_same_length_on_every_rank():
    rows = list(range(5))
    assert rank_slice(rows, 2, 0) == ([0, 2, 4], 3)
    assert rank_slice(rows, 2, 1) == ([1, 3, 0], 2)  # padded with rows[0], two real
    assert rank_slice(rows, 4, 3) == ([3, 0], 1)


def test_sums_give_the_mean_over_everything_counted_and_zero_for_nothing():
    sums = MetricSums()
    sums.add("loss", torch.tensor(6.0), 3)  # a micro-batch: 3 tokens summing to 6
    sums.add("loss", torch.tensor(1.0), 1)  # another: 1 token
    sums.add("empty", torch.tensor(0.0), 0)  # an all-padding batch
    strategy = SingleDeviceStrategy(torch.device("cpu"))
    assert sums.means(strategy, torch.device("cpu")) == {"empty": 0.0, "loss": 7.0 / 4}  # not (2 + 1) / 2
    assert not sums  # reset after the reduce
