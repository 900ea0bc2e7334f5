"""The benchmark's workload: one model config and one synthetic data set, the same for both trainers.

Pure helpers (no torch, no trainer): the settings, the seeded random-token rows, the batch plans
(which rows go in which batch, in which order), real-token counts, and the model folder.

Rows are token ids, generated once by the parent process and read by every worker, so that both
trainers see identical ids. A DPO row is ``{index, prompt_input_ids, chosen_input_ids,
rejected_input_ids}``; an SFT row is ``{input_ids, labels}`` with every token labelled except the
first (nothing predicts it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

IGNORE_INDEX = -100
FIRST_TOKEN_ID = 3  # ids 0-2 are <unk>, <s>, </s> in the embedded tokenizer: random tokens avoid them


@dataclass(frozen=True)
class Workload:
    """Everything both trainers share. Defaults: the issue's workload (issue 5, item 1)."""

    # model: a random-init Mistral
    hidden: int = 512
    intermediate: int = 1408
    layers: int = 8
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 8192
    attn: str = "sdpa"
    dtype: str = "float32"
    # optimisation
    lr: float = 1e-5
    accumulate: int = 1
    # DPO
    pairs: int = 256
    prompt_min: int = 64
    prompt_max: int = 256
    completion_min: int = 32
    completion_max: int = 256
    pair_batch: int = 8
    beta: float = 0.1
    loss_type: str = "sigmoid"
    # DPO with LoRA (the dpo-lora case): the adapter on all seven linears of every layer
    lora_r: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # 0: both trainers then run the very same network, step for step
    # SFT
    sequences: int = 256
    sequence_min: int = 128
    sequence_max: int = 512
    sft_batch: int = 8
    # both
    max_length: int = 512
    threads: int = 2
    seed: int = 0
    # measurement: ``warmup`` optimizer steps excluded from timing, ``steps`` in all (None: one epoch)
    warmup: int = 2
    steps: int | None = 10

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Workload:
        return cls(**data)

    def with_overrides(self, overrides: list[str]) -> Workload:
        """``key=value`` strings (``--set layers=2``), each parsed as the field's type."""
        changes = {}
        fields = {f.name: f for f in dataclasses.fields(self)}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or key not in fields:
                raise ValueError(f"--set {item!r}: expected key=value with key one of {', '.join(fields)}")
            current = getattr(self, key)
            if value.lower() in ("none", "null"):
                changes[key] = None
            elif isinstance(current, bool):
                changes[key] = value.lower() in ("1", "true", "yes")
            elif isinstance(current, int) or key == "steps":
                changes[key] = int(value)
            elif isinstance(current, float):
                changes[key] = float(value)
            else:
                changes[key] = value
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        if self.prompt_max + self.completion_max > self.max_length:
            raise ValueError("prompt_max + completion_max must fit max_length (the rows are never truncated)")
        if self.sequence_max > self.max_length:
            raise ValueError("sequence_max must fit max_length")
        if self.steps is not None and self.steps <= self.warmup:
            raise ValueError(f"steps={self.steps} leaves no timed step after warmup={self.warmup}")


QUICK = {"pairs": 16, "sequences": 16, "warmup": 2, "steps": 4}  # 2 batches, cycled: 2 warm-up + 2 timed steps


# ---- rows ------------------------------------------------------------------------------------
def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(n)]


def dpo_rows(w: Workload) -> list[dict]:
    """``w.pairs`` pairs of random tokens: prompt, chosen and rejected lengths uniform in their ranges."""
    rng = random.Random(f"dpo-{w.seed}")
    rows = []
    for index in range(w.pairs):
        prompt = _tokens(rng, rng.randint(w.prompt_min, w.prompt_max), w.vocab)
        chosen = _tokens(rng, rng.randint(w.completion_min, w.completion_max), w.vocab)
        rejected = _tokens(rng, rng.randint(w.completion_min, w.completion_max), w.vocab)
        rows.append({"index": index, "prompt_input_ids": prompt, "chosen_input_ids": chosen,
                     "rejected_input_ids": rejected})
    return rows


def sft_rows(w: Workload) -> list[dict]:
    """``w.sequences`` sequences of random tokens, lengths uniform in their range, all labelled but the first."""
    rng = random.Random(f"sft-{w.seed}")
    rows = []
    for _ in range(w.sequences):
        ids = _tokens(rng, rng.randint(w.sequence_min, w.sequence_max), w.vocab)
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
    return rows


def pair_tokens(row: dict) -> int:
    """Real (non-pad) tokens of one pair in the ``(2B, T)`` batch: the prompt appears twice."""
    prompt = len(row["prompt_input_ids"])
    return 2 * prompt + len(row["chosen_input_ids"]) + len(row["rejected_input_ids"])


def pair_length(row: dict) -> int:
    """The padded length a pair needs: its prompt plus its longer completion."""
    return len(row["prompt_input_ids"]) + max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))


def label_count(labels: list[int]) -> int:
    return sum(label != IGNORE_INDEX for label in labels)


# ---- batch plans -----------------------------------------------------------------------------
def sequential_batches(n: int, batch_size: int) -> list[list[int]]:
    """``[[0..B-1], [B..2B-1], ...]``; a shorter last batch is kept (as a DataLoader does)."""
    return [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]


def plan_steps(epoch_plan, steps: int | None, accumulate: int = 1) -> list[list[int]]:
    """The micro-batches of a run: one epoch (``steps`` None), or ``steps * accumulate`` micro-batches
    taken from epoch after epoch. ``epoch_plan(epoch)`` returns that epoch's batches."""
    first = epoch_plan(0)
    if steps is None:
        return first
    wanted, batches, epoch = steps * accumulate, list(first), 0
    while len(batches) < wanted:
        epoch += 1
        batches += epoch_plan(epoch)
    return batches[:wanted]


def rows_needed(w: Workload, kind: str) -> int:
    """Rows that ``steps`` optimizer steps read in dataset order (all of them for a whole epoch)."""
    total, batch = (w.pairs, w.pair_batch) if kind == "dpo" else (w.sequences, w.sft_batch)
    if w.steps is None:
        return total
    return min(total, w.steps * w.accumulate * batch)


def window_label_tokens(batches: list[list[int]], counts: list[int], accumulate: int) -> list[int]:
    """For each micro-batch, the label tokens of its accumulation window (what SFT normalises by)."""
    out = []
    for start in range(0, len(batches), accumulate):
        window = batches[start : start + accumulate]
        total = sum(counts[i] for batch in window for i in batch)
        out += [total] * len(window)
    return out


def window_rows(batches: list[list[int]], accumulate: int) -> list[int]:
    """For each micro-batch, the rows of its accumulation window (what DPO's pair mean divides by)."""
    out = []
    for start in range(0, len(batches), accumulate):
        window = batches[start : start + accumulate]
        out += [sum(len(batch) for batch in window)] * len(window)
    return out


# ---- the model folder ------------------------------------------------------------------------
def mistral_config(w: Workload) -> dict:
    """A Mistral ``config.json`` for the workload's shape (ids as the embedded tokenizer has them)."""
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": w.hidden,
        "intermediate_size": w.intermediate,
        "num_hidden_layers": w.layers,
        "num_attention_heads": w.heads,
        "num_key_value_heads": w.kv_heads,
        "head_dim": w.hidden // w.heads,
        "vocab_size": w.vocab,
        "max_position_embeddings": max(1024, w.max_length),
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "use_cache": True,
    }


def write_model_folder(w: Workload, folder: Path, tokenizer_folder: Path) -> Path:
    """``folder/config.json`` for the workload plus the embedded tokenizer (pad = eos = 2 < vocab).
    No weights: both sides random-init from it with the same seed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(mistral_config(w), indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tokenizer_folder / name).exists():
            shutil.copy(tokenizer_folder / name, folder / name)
    return folder


def parameter_count(w: Workload) -> dict[str, int]:
    """Parameters of the Mistral shape: ``total`` and ``compute`` (all but the input embedding, whose
    lookup costs no FLOPs; the LM head counts). Used for MFU: ``6 * compute * tokens/s``."""
    head_dim = w.hidden // w.heads
    attention = w.hidden * head_dim * (2 * w.heads + 2 * w.kv_heads)  # q, o and k, v projections
    mlp = 3 * w.hidden * w.intermediate
    layer = attention + mlp + 2 * w.hidden  # two RMSNorm weights
    embedding = w.vocab * w.hidden
    body = w.layers * layer + w.hidden  # final norm
    return {"total": body + 2 * embedding, "compute": body + embedding}


def describe_model(w: Workload) -> str:
    millions = parameter_count(w)["total"] / 1e6
    return (f"Mistral {millions:.1f}M params (hidden {w.hidden}, intermediate {w.intermediate}, {w.layers} layers, "
            f"{w.heads} heads / {w.kv_heads} KV, vocab {w.vocab}, {w.attn}, {w.dtype})")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
