"""Greedy generation on held-out prompts with one checkable answer, compared exactly."""

from __future__ import annotations

import lightning as L
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from zephyr_lit.generation import ChatRequest, Sampling, generate_with_model


def greedy_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict]],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    synced_gpus: bool | None = None,
) -> list[str]:
    """The model's greedy reply to each conversation, through the one generation path."""
    requests = [ChatRequest(c, Sampling(temperature=0.0, max_new_tokens=max_new_tokens)) for c in conversations]
    return [r.text for r in generate_with_model(model, tokenizer, requests, batch_size, synced_gpus)]


def exact_matches(replies: list[str], answers: list[str]) -> int:
    """How many replies equal their answer after stripping surrounding whitespace."""
    return sum(reply.strip() == answer.strip() for reply, answer in zip(replies, answers))


def rank_slice(rows: list, world_size: int, rank: int) -> tuple[list, int]:
    """``(rows r, r + W, r + 2W, ...)`` padded with copies of ``rows[0]`` to ``ceil(n / W)`` rows, and how
    many of them are real: every rank then makes the same number of ``generate`` calls, which ZeRO-3
    needs (``synced_gpus``: each call gathers the shards on all ranks)."""
    mine = rows[rank::world_size]
    per_rank = -(-len(rows) // world_size)
    return mine + rows[:1] * (per_rank - len(mine)), len(mine)


def exact_match_rate(
    trainer: L.Trainer,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    max_new_tokens: int = 32,
    batch_size: int = 32,
) -> torch.Tensor:
    """Fraction of ``rows`` (``{messages, answer}``) answered exactly; each rank answers an equal slice
    (``rank_slice``), only its real rows count."""
    mine, real = rank_slice(rows, trainer.world_size, trainer.global_rank)
    replies = greedy_replies(model, tokenizer, [r["messages"] for r in mine], max_new_tokens, batch_size)
    device = next(model.parameters()).device
    hits = torch.tensor(float(exact_matches(replies[:real], [r["answer"] for r in mine[:real]])), device=device)
    return trainer.strategy.reduce(hits, reduce_op="sum") / len(rows)
