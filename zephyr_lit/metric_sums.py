"""Means over a window or a validation epoch, on all ranks: sums and counts, reduced in one all-reduce.

    mean[name] = sum over ranks and micro-batches of total[name] / sum of count[name]   (0 when the count is 0)

Every rank must call ``add`` with the same names (a batch of padding adds zeros) and ``reduce`` at
the same point: the reduce is one collective over a stacked tensor.
"""

from __future__ import annotations

import torch


class MetricSums:
    def __init__(self) -> None:
        self.totals: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, name: str, total: torch.Tensor | float, count: torch.Tensor | float) -> None:
        """Add a detached ``total`` (a sum over rows or tokens) and its ``count`` to ``name``; fp64."""
        total = torch.as_tensor(total).detach().to(torch.float64)
        count = torch.as_tensor(count).detach().to(device=total.device, dtype=torch.float64)
        if name in self.totals:
            self.totals[name] = self.totals[name] + total
            self.counts[name] = self.counts[name] + count
        else:
            self.totals[name], self.counts[name] = total, count

    def __bool__(self) -> bool:
        return bool(self.totals)

    def reduce(self, strategy, device: torch.device) -> dict[str, tuple[float, float]]:
        """``{name: (total, count)}`` summed over ranks (``strategy.reduce``, one call), in name order;
        then starts again from zero."""
        names = sorted(self.totals)
        if not names:
            return {}
        stacked = torch.stack([torch.stack([self.totals[n], self.counts[n]]) for n in names]).to(device)  # (M, 2)
        stacked = strategy.reduce(stacked, reduce_op="sum")
        self.totals, self.counts = {}, {}
        return {name: (total, count) for name, (total, count) in zip(names, stacked.tolist())}

    def means(self, strategy, device: torch.device) -> dict[str, float]:
        """``{name: total / count}`` over all ranks (0 where nothing was counted); then starts again."""
        return {name: total / count if count else 0.0 for name, (total, count) in self.reduce(strategy, device).items()}
