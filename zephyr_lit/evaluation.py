"""Greedy generation on held-out prompts with one checkable answer, compared exactly."""

from __future__ import annotations

import lightning as L
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def greedy_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict]],
    max_new_tokens: int = 32,
    batch_size: int = 32,
) -> list[str]:
    """The model's greedy reply to each conversation (chat template + generation prompt, BOS once)."""
    replies: list[str] = []
    device = next(model.parameters()).device
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chunk]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]  # (B, new)
        replies.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return replies


def exact_matches(replies: list[str], answers: list[str]) -> int:
    """How many replies equal their answer after stripping surrounding whitespace."""
    return sum(reply.strip() == answer.strip() for reply, answer in zip(replies, answers))


def exact_match_rate(
    trainer: L.Trainer,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    max_new_tokens: int = 32,
) -> torch.Tensor:
    """Fraction of ``rows`` (``{messages, answer}``) answered exactly; each rank takes a slice."""
    mine = rows[trainer.global_rank :: trainer.world_size]
    replies = greedy_replies(model, tokenizer, [r["messages"] for r in mine], max_new_tokens)
    device = next(model.parameters()).device
    hits = torch.tensor(float(exact_matches(replies, [r["answer"] for r in mine])), device=device)
    return trainer.strategy.reduce(hits, reduce_op="sum") / len(rows)
