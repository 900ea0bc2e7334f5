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
    """Yield this rank's micro-batches as lists of ``(index, window_tokens, window_rows)``: the sum of
    ``label_counts`` over the micro-batch's whole window (all its micro-batches, all ranks) and the
    number of rows in that window.

    One global micro-step takes ``batch_size * world_size`` examples of a seeded permutation
    (reshuffled per epoch via ``set_epoch``); rank ``r`` takes the ``r``-th slice of each; a window is
    ``accumulate`` consecutive global micro-steps counted from the start of the epoch, and the last
    window of an epoch may be shorter (it still trains: see ``zephyr_lit/windows.py``).
    A trailing global micro-step with fewer than ``world_size`` full slices is dropped so that every
    rank runs the same number of steps.

    **Length grouping** (``lengths`` given: each row's padded length): the permutation, cut to whole
    global micro-steps, is split into mega-chunks of ``mega_batches`` global micro-steps; each chunk is
    sorted by length, longest first (stable), and cut into global micro-steps, so a micro-step holds rows
    of similar length (less padding). The order of the global micro-steps is then shuffled (seeded by
    ``seed + epoch``), except that the one holding the epoch's longest row goes first, as in HF's
    ``LengthGroupedSampler``: a batch that does not fit in memory fails at once, not hours in. With
    ``shuffle=False`` nothing is random: chunks of the dataset order, each sorted, in chunk order (the
    longest step still first). Rank ``r`` still takes the ``r``-th slice of each global micro-step, so
    rank 0 gets its longest rows. Windows and their token counts follow the final order. Everything is
    the same on every rank.

    **Resuming** (``start_at(n)``): the next iteration skips the epoch's first ``n`` micro-batches
    (without loading them) and yields the rest exactly as an uninterrupted iteration would.
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
        lengths: Sequence[int] | None = None,
        mega_batches: int = 50,
    ) -> None:
        self.label_counts = torch.as_tensor(label_counts, dtype=torch.long)
        self.batch_size, self.accumulate = batch_size, accumulate
        self.world_size, self.rank = world_size, rank
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.lengths = None if lengths is None else torch.as_tensor(lengths, dtype=torch.long)
        if self.lengths is not None and len(self.lengths) != len(self.label_counts):
            raise ValueError(f"{len(self.lengths)} lengths for {len(self.label_counts)} rows")
        if mega_batches < 1:
            raise ValueError(f"mega_batches={mega_batches}: must be >= 1")
        self.mega_batches = mega_batches
        self.start = 0

    def start_at(self, micro_batches: int) -> None:
        """Make the next iteration begin at this epoch's micro-batch ``micro_batches`` (0: the start)."""
        self.start = micro_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.label_counts) // (self.batch_size * self.world_size)

    def global_steps(self) -> torch.Tensor:
        """This epoch's global micro-steps in order, ``(steps, world_size, batch_size)`` row indices;
        the same on every rank."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n, step = len(self.label_counts), self.batch_size * self.world_size
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        order = order[: len(self) * step]
        if self.lengths is not None and len(self):
            order = self.grouped(order, generator)
        return order.view(len(self), self.world_size, self.batch_size)

    def grouped(self, order: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``order`` (whole global micro-steps) with each mega-chunk sorted longest first, then its
        global micro-steps reordered: the longest first, the rest shuffled when ``shuffle``."""
        step = self.batch_size * self.world_size
        chunks = torch.split(order, self.mega_batches * step)
        order = torch.cat([c[torch.sort(self.lengths[c], descending=True, stable=True).indices] for c in chunks])
        steps = order.view(-1, step)
        rest = torch.randperm(len(steps), generator=generator) if self.shuffle else torch.arange(len(steps))
        longest = self.lengths[steps[:, 0]].argmax()  # a step's first row is its longest; first such step
        return steps[torch.cat([longest.view(1), rest[rest != longest]])].flatten()

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        steps = self.global_steps()  # (S, W, B)
        skip, self.start = self.start, 0
        for start in range(0, len(self), self.accumulate):
            window = steps[start : start + self.accumulate]  # (k, W, B), k = accumulate except at the epoch's end
            tokens, rows = int(self.label_counts[window.flatten()].sum()), window.numel()
            for position, micro_step in enumerate(window, start):
                if position >= skip:
                    yield [(int(index), tokens, rows) for index in micro_step[self.rank]]


class WindowedDataset(Dataset):
    """Wrap a map-style dataset so that ``(index, window_tokens, window_rows)`` keys add
    ``window_tokens`` and ``window_rows`` to the row (a plain ``index`` returns the row alone)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int] | int) -> dict:
        if not isinstance(key, tuple):
            return dict(self.dataset[key])
        index, tokens, rows = key
        return dict(self.dataset[index], window_tokens=tokens, window_rows=rows)
