"""One generation path: chat requests in, replies out.

Every part that makes text goes through it: ``val/exact_match``, distillation's stages (completions,
ratings, dialogues) and evaluation's answers. A backend is anything with ``name`` and
``generate(requests) -> replies`` (``distill/backends.py``: hf, openai, vllm, scripted, rule).

``generate_with_model`` is the transformers implementation: the tokenizer's own chat template with the
generation prompt, left padding, batches, and one seed per request. Sampling draws each row's token as
``argmax(logits / T + Gumbel noise)`` (a sample from the softmax) with the noise from that row's own
``torch.Generator``, so a request's reply depends on its seed, not on the batch it shares or the
global RNG: a stage that is killed and rerun, or split over ranks, gets the same replies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

FINISH_REASONS = ("stop", "length", "error")


@dataclass(frozen=True)
class Sampling:
    """How to sample. ``temperature=0`` is greedy (``top_p`` is then unused)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512


@dataclass(frozen=True)
class ChatRequest:
    """One conversation to continue: ``messages`` (``{role, content}``, ending with a user turn)."""

    messages: tuple[dict, ...] | list[dict]
    sampling: Sampling = field(default_factory=Sampling)
    seed: int = 0


@dataclass(frozen=True)
class Reply:
    """A reply: ``finish_reason`` ``stop`` (ended by the model), ``length`` (cut at ``max_new_tokens``) or
    ``error`` (no reply; ``error`` says why)."""

    text: str
    finish_reason: str = "stop"
    error: str | None = None

    @property
    def ok(self) -> bool:
        """A complete, non-empty reply."""
        return self.finish_reason == "stop" and bool(self.text.strip())


class Backend(Protocol):
    """What the stages call. ``name`` is recorded in the outputs (UltraFeedback's ``models``)."""

    name: str

    def generate(self, requests: Sequence[ChatRequest]) -> list[Reply]: ...


def request_seed(*parts: object) -> int:
    """A seed (0 <= s < 2**63) from the parts that identify a request, e.g. ``(seed, prompt_id, 2)``:
    the same request always gets the same seed, whatever else runs with it."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class SeededSampler(LogitsProcessor):
    """Turns greedy search into sampling with one generator per row: temperature, nucleus (``top_p``),
    then Gumbel noise, so that greedy's argmax is a draw from the tempered, truncated softmax.
    Rows with temperature 0 stay greedy."""

    def __init__(self, samplings: Sequence[Sampling], seeds: Sequence[int], device: torch.device) -> None:
        self.samplings = list(samplings)
        # on the model's device, so the noise is drawn where the logits are (no host-to-device copy)
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()  # (B, V)
        out = scores.clone()
        for row, (sampling, generator) in enumerate(zip(self.samplings, self.generators)):
            if sampling.temperature <= 0:
                continue
            logits = scores[row] / sampling.temperature  # (V,)
            if sampling.top_p < 1.0:
                logits = nucleus(logits, sampling.top_p)
            uniform = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-10, 1.0 - 1e-7)
            out[row] = logits - torch.log(-torch.log(uniform))  # (V,) + Gumbel noise
        return out


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits`` (V,) with every token outside the smallest set of probability >= ``top_p`` at -inf
    (the most likely token always stays)."""
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already >= p
    kept = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(0, order, kept)


def render_prompts(tokenizer: PreTrainedTokenizerBase, requests: Sequence[ChatRequest]) -> list[str]:
    """Each request through the tokenizer's chat template, with the generation prompt."""
    return [
        tokenizer.apply_chat_template(list(r.messages), tokenize=False, add_generation_prompt=True) for r in requests
    ]


@torch.no_grad()
def generate_with_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[ChatRequest],
    batch_size: int = 32,
    synced_gpus: bool | None = None,
) -> list[Reply]:
    """Replies of a transformers causal LM, ``batch_size`` requests per ``generate`` call, left-padded.

    BOS appears once: the tokenizer adds it unless the template already wrote it (Llama-style
    templates do, Zephyr's does not). A batch runs to its longest request's ``max_new_tokens``; each reply is cut at
    its own. ``synced_gpus`` (None: transformers decides, on under ZeRO-3): every rank must then make
    the same calls, since each gathers the shards on all ranks.
    """
    replies: list[Reply] = []
    device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, tokenizer)
    for start in range(0, len(requests), batch_size):
        chunk = list(requests[start : start + batch_size])
        prompts = render_prompts(tokenizer, chunk)
        inputs = tokenizer(
            prompts, return_tensors="pt", padding=True, padding_side="left",
            add_special_tokens=not template_writes_bos(tokenizer, prompts[0]),
        ).to(device)
        samples = any(r.sampling.temperature > 0 for r in chunk)  # all greedy (exact match): plain greedy search
        sampler = [SeededSampler([r.sampling for r in chunk], [r.seed for r in chunk], device)] if samples else []
        output = model.generate(
            **inputs,
            max_new_tokens=max(r.sampling.max_new_tokens for r in chunk),
            do_sample=False,
            logits_processor=LogitsProcessorList(sampler),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids,
            synced_gpus=synced_gpus,
            temperature=None, top_p=None, top_k=None,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]  # (B, new)
        for request, tokens in zip(chunk, new_tokens.tolist()):
            replies.append(decode_reply(tokenizer, tokens, eos_ids, request.sampling.max_new_tokens))
    return replies


def template_writes_bos(tokenizer: PreTrainedTokenizerBase, rendered: str) -> bool:
    """True when the chat template's text already starts with the BOS token."""
    return bool(tokenizer.bos_token) and rendered.startswith(tokenizer.bos_token)


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end a reply: the generation config's (chat models often list several) and the
    tokenizer's."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in ids if i is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def decode_reply(tokenizer: PreTrainedTokenizerBase, tokens: list[int], eos_ids: list[int], limit: int) -> Reply:
    """Text up to the first end token within ``limit`` tokens; ``length`` when none came."""
    tokens = tokens[:limit]
    end = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    kept = tokens if end is None else tokens[:end]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    return Reply(text=text, finish_reason="length" if end is None else "stop")
