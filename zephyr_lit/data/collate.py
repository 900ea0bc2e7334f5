"""Collation: pad a list of tokenised rows into one batch of tensors."""

from __future__ import annotations

import torch

from zephyr_lit.data.tokenize import IGNORE_INDEX


def padded_length(longest: int, multiple_of: int | None) -> int:
    """``longest`` rounded up to a multiple of ``multiple_of`` (tensor cores like multiples of 8)."""
    if not multiple_of:
        return longest
    return -(-longest // multiple_of) * multiple_of


def pad_batch(rows: list[dict], pad_id: int, pad_to_multiple_of: int | None = 8) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (with ``pad_id``) and ``labels`` (with -100) to one length.

    Rows with ``position_ids`` (packed rows) keep them, and the batch has no ``attention_mask``: the
    model then derives the per-example causal mask from the restarting positions. Padding gets
    positions 0, 1, ... so it forms its own segment and never attends into a real example.
    Other rows get an ``attention_mask``. Shapes: every tensor is ``(B, T)``.
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
    batch["position_ids" if packed else "attention_mask"] = extra
    if "window_tokens" in rows[0]:  # see data/sampler.py
        batch["window_tokens"] = torch.tensor(rows[0]["window_tokens"], dtype=torch.long)
    return batch
