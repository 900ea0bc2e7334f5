"""A batch sampler that knows each optimizer step's token count in advance, on every rank.

The SFT loss is the mean over the real label tokens of the whole global batch (all micro-batches of
one gradient-accumulation window, on all ranks), not a mean of per-micro-batch means. To scale each
micro-batch's summed loss correctly, every micro-batch carries the label-token count of its window.
The sampler can count them because it draws the same permutation on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset


class WindowBatchSampler:
    """Yield this rank's micro-batches as lists of ``(index, window_label_tokens)``.

    One global micro-step takes ``batch_size * world_size`` examples of a seeded permutation
    (reshuffled per epoch via ``set_epoch``); rank ``r`` takes the ``r``-th slice of each; a window is
    ``accumulate`` consecutive global micro-steps (the last window of an epoch may be shorter).
    A trailing global micro-step with fewer than ``world_size`` full slices is dropped so that every
    rank runs the same number of steps.
    """

    def __init__(
        self,
        label_counts: Sequence[int],
        batch_size: int,
        accumulate: int = 1,
        world_size: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        self.label_counts = torch.as_tensor(label_counts, dtype=torch.long)
        self.batch_size, self.accumulate = batch_size, accumulate
        self.world_size, self.rank = world_size, rank
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.label_counts) // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        n = len(self.label_counts)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        step = self.batch_size * self.world_size
        steps = order[: len(self) * step].view(len(self), self.world_size, self.batch_size)  # (S, W, B)
        for start in range(0, len(self), self.accumulate):
            window = steps[start : start + self.accumulate]  # (A, W, B)
            tokens = int(self.label_counts[window.flatten()].sum())
            for micro_step in window:
                yield [(int(i), tokens) for i in micro_step[self.rank]]


class WindowedDataset(Dataset):
    """Wrap a map-style dataset so that ``(index, window_tokens)`` keys add ``window_tokens`` to the row."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        index, tokens = key if isinstance(key, tuple) else (key, None)
        row = dict(self.dataset[index])
        if tokens is not None:
            row["window_tokens"] = tokens
        return row
