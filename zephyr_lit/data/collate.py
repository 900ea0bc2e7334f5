"""Collation: pad a list of tokenised rows into one batch of tensors.

Packed rows (``position_ids`` restarting at each example, no ``attention_mask``) are laid out for the
attention implementation: for eager, sdpa and flex, transformers builds a block-diagonal causal mask
from the positions of a ``(B, T)`` batch, but its flash-attention path reads packing from the
positions only when the batch dimension is 1, so for it the rows are flattened into one ``(1, N)``
row (varlen, no padding between rows).
"""

from __future__ import annotations

import torch

from zephyr_lit.data.tokenize import IGNORE_INDEX

WINDOW_KEYS = ("window_tokens", "window_rows")  # what WindowedDataset adds to each training row
# transformers' flash-attention forward treats position_ids as packed only for batch size 1
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def padded_length(longest: int, multiple_of: int | None) -> int:
    """``longest`` rounded up to a multiple of ``multiple_of`` (tensor cores like multiples of 8)."""
    if not multiple_of:
        return longest
    return -(-longest // multiple_of) * multiple_of


def pad_batch(
    rows: list[dict], pad_id: int, pad_to_multiple_of: int | None = 8, attn_implementation: str = "sdpa"
) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (with ``pad_id``) and ``labels`` (with -100) to one length.

    Rows with ``position_ids`` (packed rows) keep them, and the batch has no ``attention_mask``: the
    model then derives the per-example causal mask from the restarting positions. Padding gets
    positions 0, 1, ... so it forms its own segment and never attends into a real example.
    Other rows get an ``attention_mask``. Shapes: every tensor is ``(B, T)``, except packed rows
    under a flash ``attn_implementation``: those come back as one ``(1, N)`` row (``flatten_packed``).
    """
    length = padded_length(max(len(r["input_ids"]) for r in rows), pad_to_multiple_of)
    batch_size = len(rows)
    input_ids = torch.full((batch_size, length), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
    packed = "position_ids" in rows[0]
    extra = torch.zeros((batch_size, length), dtype=torch.long)  # positions or attention mask
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(row["input_ids"])
        labels[i, :n] = torch.as_tensor(row["labels"])
        if packed:
            extra[i, :n] = torch.as_tensor(row["position_ids"])
            extra[i, n:] = torch.arange(length - n)
        else:
            extra[i, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels}
    batch["num_tokens"] = torch.tensor(sum(len(r["input_ids"]) for r in rows))  # real, non-pad tokens
    batch["num_rows"] = torch.tensor(batch_size)  # rows before any flattening (throughput counts them)
    batch["position_ids" if packed else "attention_mask"] = extra
    for key in WINDOW_KEYS:  # the same for every row of a micro-batch: see data/sampler.py
        if key in rows[0]:
            batch[key] = torch.tensor(rows[0][key], dtype=torch.long)
    if packed and attn_implementation in VARLEN_ATTENTION:
        lengths = torch.tensor([len(r["input_ids"]) for r in rows])
        return flatten_packed(batch, lengths, pad_id, pad_to_multiple_of)
    return batch


def flatten_packed(
    batch: dict[str, torch.Tensor], lengths: torch.Tensor, pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Packed ``(B, T)`` rows -> one ``(1, N)`` row of their real tokens, the layout flash attention
    runs as variable-length sequences (one per example, boundaries where the positions restart).

    ``batch`` holds ``input_ids``, ``labels`` and ``position_ids`` ``(B, T)``, row ``b`` real in
    ``[:lengths[b]]`` and padding after; ``lengths`` is ``(B,)``. The result holds the ``n =
    lengths.sum()`` real tokens row after row, then ``N - n`` padding tokens (``pad_id``, label -100,
    positions 0, 1, ...: a segment of its own) with ``N`` = ``n`` rounded up to ``pad_to_multiple_of``.
    Every example's first label is already -100, so no loss crosses into the next example, also
    where two former rows meet. Other keys (``num_tokens``, the window counts) are kept as they are.
    """
    device = batch["input_ids"].device
    real = torch.arange(batch["input_ids"].size(1), device=device) < lengths.to(device).unsqueeze(1)  # (B, T)
    n = int(lengths.sum())
    total = padded_length(n, pad_to_multiple_of)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}
    flat = dict(batch)
    for key in ("input_ids", "labels", "position_ids"):
        values = batch[key].new_empty(total)  # (N,)
        values[:n] = batch[key][real]  # (B, T) -> (n,), row-major: row 0's tokens first
        values[n:] = torch.arange(total - n, device=device) if key == "position_ids" else fill[key]
        flat[key] = values.unsqueeze(0)  # (1, N)
    return flat
