"""The dDPO data module: preference rows (UltraFeedback-binarized schema) -> validated, tokenised pairs.

A row holds ``chosen`` and ``rejected``: two message lists with the same turns before a different
final assistant turn. Conventions (tested on exact token ids in ``tests/test_preference_data.py``):

- **Prompt** = every turn of ``chosen`` before its final assistant turn (an empty system turn put in
  front when there is none, as ``render`` does), rendered *with* the generation prompt: the
  ``<|assistant|>\\n`` tag belongs to the prompt. **Completion** = the final assistant content plus
  ``</s>`` (EOS, labelled: it is how the model learns to stop); no ``\\n`` after it.
- ``prompt_text + completion_text`` is tokenised as **one** string with offsets, BOS added once by
  the tokenizer; the prompt is every token before the first one starting at or after
  ``len(prompt_text)``. The prompt ids of chosen and rejected must agree (else a ``DataError`` names
  the row). Each example stores ``prompt_input_ids`` (from BOS), ``chosen_input_ids`` and
  ``rejected_input_ids`` (completion ids only), their lengths, and ``index``: the row's position in
  the split after drops, ``0..n-1``, stable across runs (the key of cached reference log-probs).
- **Truncation** (``truncate_pair``; the rule of TRL 0.7's ``DPOTrainer``, ``truncation_mode="keep_end"``,
  that the handbook's Zephyr recipe trained with): a pair *overflows* when ``len(prompt) +
  max(len(chosen), len(rejected)) > max_length``. A pair that fits is kept whole, however long its
  prompt. An overflowing pair's prompt, if longer than ``max_prompt_length``, keeps BOS and its *last*
  ``max_prompt_length - 1`` tokens (the question nearest the answer); if the pair still overflows,
  both completions are cut on the right to ``max_length - max_prompt_length`` tokens (``</s>`` may
  go). With ``max_prompt_length`` null the prompt is never cut and an overflowing pair's completions
  are cut to ``max_length - len(prompt)``. A row left with no completion token (possible only when
  ``max_prompt_length`` is null or >= ``max_length``) is dropped.
- **Drops** (counted, logged once per split): chosen identical to rejected; no completion token fits.
- **Bad rows** stop ``prepare`` before any model exists, one line naming file, split, row and field:
  a missing ``chosen``/``rejected``, a malformed message list (``check_messages``), a list not ending
  with an assistant turn, two different prompts (``chosen[:-1] != rejected[:-1]``), an empty
  completion. Local JSON files Arrow cannot read are explained by the same checks.
- **Batches** (``collate_pairs``): one ``(2B, T)`` batch for a single policy forward pass, rows
  ``0..B-1`` prompt+chosen and ``B..2B-1`` prompt+rejected, right-padded with the pad id (= eos);
  labels are -100 on prompt and padding (by position, never by id), the completion ids elsewhere.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import datasets
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from zephyr_lit.chat import render
from zephyr_lit.data.base import EqualShard, ShardedDataModule
from zephyr_lit.data.collate import WINDOW_KEYS, pad_batch
from zephyr_lit.data.fingerprint import fingerprint, tokenizer_fingerprint
from zephyr_lit.data.load import Split
from zephyr_lit.data.tokenize import IGNORE_INDEX
from zephyr_lit.data.validate import check_messages, reasons, row_problem, where
from zephyr_lit.errors import DataError

log = logging.getLogger(__name__)

# Bump when the pair tokenisation below changes meaning, so that old caches are not reused.
PREFERENCE_VERSION = "2"  # 2: TRL's rule, the prompt cut only when the pair overflows max_length
SIDES = ("chosen", "rejected")
COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
           "prompt_length", "chosen_length", "rejected_length", "index")


@dataclass
class PreferenceSplitStats:
    """What happened to one split's rows. Truncations are counted over the kept pairs; a pair whose
    chosen and rejected are both cut counts twice in ``truncated_completions``."""

    rows: int = 0                   # rows read (after max_*_samples)
    pairs: int = 0                  # pairs kept
    truncated_prompts: int = 0
    truncated_completions: int = 0
    dropped_identical: int = 0      # chosen == rejected: no preference to learn
    dropped_no_room: int = 0        # the prompt left no room for one completion token
    dropped: int = 0
    completion_tokens: int = 0      # chosen + rejected tokens of the kept pairs
    bad_rows: dict[str, int] = field(default_factory=dict)  # data.bad_rows=drop: dropped, by reason


# ---- checks --------------------------------------------------------------------------------
def check_pair(row: dict, at: str) -> tuple[list[dict], list[dict]]:
    """Check one preference row and return ``(chosen, rejected)``; raise a one-line ``DataError``."""
    pair = []
    for side in SIDES:
        messages = check_messages(row.get(side), at, side)
        if messages[-1]["role"] != "assistant":
            raise DataError(
                f"{at}: field '{side}' must end with an assistant turn (the completion); "
                f"its last turn is {messages[-1]['role']!r}", field=side, reason="no_final_assistant"
            )
        pair.append(messages)
    chosen, rejected = pair
    if len(chosen) != len(rejected):
        raise DataError(
            f"{at}: field 'rejected' has {len(rejected) - 1} prompt turns, 'chosen' has {len(chosen) - 1}: "
            "two different prompts (chosen[:-1] must equal rejected[:-1])", field="rejected", reason="prompt_mismatch"
        )
    for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])):
        for key in ("role", "content"):
            if a[key] != b[key]:
                raise DataError(
                    f"{at}: field 'rejected[{i}].{key}' differs from 'chosen[{i}].{key}': "
                    "two different prompts (chosen[:-1] must equal rejected[:-1])",
                    field=f"rejected[{i}].{key}", reason="prompt_mismatch",
                )
    return chosen, rejected


def _check_row(row: dict, at: str) -> None:
    check_pair(row, at)


# ---- tokenisation ----------------------------------------------------------------------------
def split_prompt_completion(
    prompt_text: str, completion_text: str, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """Tokenise ``prompt_text + completion_text`` once (BOS by the tokenizer) and split it where
    the first token starts at or after ``len(prompt_text)``."""
    encoding = tokenizer(prompt_text + completion_text, return_offsets_mapping=True, add_special_tokens=True)
    ids: list[int] = encoding["input_ids"]
    cut = next((i for i, (start, _) in enumerate(encoding["offset_mapping"]) if start >= len(prompt_text)), len(ids))
    return ids[:cut], ids[cut:]


@dataclass
class PairTokens:
    """One pair's ids after truncation; each ``*_truncated`` flag says that part lost tokens."""

    prompt_input_ids: list[int]
    chosen_input_ids: list[int]
    rejected_input_ids: list[int]
    prompt_truncated: bool
    chosen_truncated: bool
    rejected_truncated: bool

    @property
    def fits(self) -> bool:
        """False when no completion token was left (the row is dropped)."""
        return bool(self.chosen_input_ids) and bool(self.rejected_input_ids)


def tokenize_pair(
    chosen: list[dict],
    rejected: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int | None,
    at: str = "pair",
) -> PairTokens:
    """Prompt and completion ids of a checked pair, truncated as the module docstring says."""
    prompt_text = render(chosen[:-1], tokenizer.eos_token, add_generation_prompt=True).text
    prompt, chosen_ids = split_prompt_completion(prompt_text, chosen[-1]["content"] + tokenizer.eos_token, tokenizer)
    prompt_r, rejected_ids = split_prompt_completion(prompt_text, rejected[-1]["content"] + tokenizer.eos_token, tokenizer)
    if prompt != prompt_r:
        raise DataError(
            f"{at}: field 'rejected' tokenises its prompt differently from 'chosen' "
            "(the tokenizer merges across the prompt/completion boundary)", field="rejected", reason="prompt_tokenisation"
        )
    return truncate_pair(prompt, chosen_ids, rejected_ids, max_length, max_prompt_length, tokenizer.bos_token_id)


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
                  max_prompt_length: int | None, bos_id: int | None) -> PairTokens:
    """The module docstring's Truncation rule on id lists (``prompt`` from BOS, completions with
    ``</s>``). Empty completions in the result mean no room: the caller drops the row."""

    def overflows(prompt_ids: list[int]) -> bool:
        return len(prompt_ids) + max(len(chosen), len(rejected)) > max_length

    prompt_truncated = False
    if overflows(prompt) and max_prompt_length is not None and len(prompt) > max_prompt_length:
        head = 1 if prompt[0] == bos_id else 0  # BOS is kept once, at the front
        prompt = prompt[:head] + prompt[len(prompt) - (max_prompt_length - head):]
        prompt_truncated = True
    if not overflows(prompt):
        return PairTokens(prompt, chosen, rejected, prompt_truncated, False, False)
    # TRL's budget: what max_prompt_length leaves of max_length, even for a shorter prompt.
    reserved = len(prompt) if max_prompt_length is None else max_prompt_length
    room = max(max_length - reserved, 0)
    return PairTokens(prompt, chosen[:room], rejected[:room], prompt_truncated, len(chosen) > room, len(rejected) > room)


def _tokenize_rows(batch: dict, indices: list[int], *, tokenizer, max_length, max_prompt_length, bad_rows,
                   source, split):
    names = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
             "prompt_truncated", "chosen_truncated", "rejected_truncated", "drop", "bad"]
    out: dict[str, list] = {name: [] for name in names}
    for chosen, rejected, index in zip(batch["chosen"], batch["rejected"], indices):
        at = where(source, split, index)
        result: list[PairTokens] = []

        def check(chosen=chosen, rejected=rejected, at=at) -> None:
            chosen, rejected = check_pair({"chosen": chosen, "rejected": rejected}, at)
            identical = chosen[-1]["content"] == rejected[-1]["content"]
            result.append(None if identical else tokenize_pair(chosen, rejected, tokenizer, max_length,
                                                               max_prompt_length, at))

        problem = row_problem(check, bad_rows, index)
        tokens = result[0] if result and result[0] is not None else PairTokens([], [], [], False, False, False)
        drop = "bad" if problem else "identical" if result[0] is None else "" if tokens.fits else "no_room"
        for name in names[:-2]:
            out[name].append(getattr(tokens, name))
        out["drop"].append(drop)
        out["bad"].append(problem)
    return out


def _finish_rows(batch: dict, indices: list[int]) -> dict:
    out = {f"{name}_length": [len(ids) for ids in batch[f"{name}_input_ids"]] for name in ("prompt", *SIDES)}
    out["index"] = list(indices)
    return out


# ---- collation -------------------------------------------------------------------------------
def collate_pairs(rows: list[dict], pad_id: int, pad_to_multiple_of: int | None = 8) -> dict[str, torch.Tensor]:
    """``B`` pairs -> ``input_ids``, ``attention_mask``, ``labels`` ``(2B, T)`` (chosen rows first),
    ``index`` and ``counted`` ``(B,)`` (False: a padding pair of an equal validation shard, counted
    in no metric), ``num_tokens`` (real, non-pad tokens) and the window counts of training rows.
    ``T`` is a multiple of ``pad_to_multiple_of``; labels are -100 on the prompt and the padding."""
    sequences = [
        {"input_ids": row["prompt_input_ids"] + row[f"{side}_input_ids"],
         "labels": [IGNORE_INDEX] * len(row["prompt_input_ids"]) + row[f"{side}_input_ids"]}
        for side in SIDES for row in rows
    ]
    batch = pad_batch(sequences, pad_id, pad_to_multiple_of)
    batch["index"] = torch.tensor([row["index"] for row in rows], dtype=torch.long)
    batch["counted"] = torch.tensor([row.get("counted", True) for row in rows])  # (B,): False = padding pair
    for key in WINDOW_KEYS:
        if key in rows[0]:
            batch[key] = torch.tensor(rows[0][key], dtype=torch.long)
    return batch


# ---- the data module ---------------------------------------------------------------------------
@dataclass(eq=False)
class PreferenceDataModule(ShardedDataModule):
    """Config fields mirror ``conf/data/ultrafeedback_*.yaml`` (and ``SFTDataModule`` where they overlap)."""

    path: str
    train_split: str = "train_prefs"
    test_split: str = "test_prefs"
    max_length: int = 1024
    max_prompt_length: int | None = 512
    batch_size: int = 8
    eval_batch_size: int | None = None
    pad_to_multiple_of: int | None = 8
    num_proc: int | None = None
    num_workers: int = 0
    cache_dir: str | None = None
    shuffle: bool = True
    seed: int = 42
    group_by_length: bool = False  # batches of pairs of similar length (see WindowBatchSampler)
    group_mega_batches: int = 50   # global micro-steps per length-sorted chunk
    prepare_data_per_node: bool = True  # tokenise once per node (false: once in all, for a shared cache)
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    exact_match_path: str | None = None
    global_batch_size: int | None = None
    bad_rows: str = "error"          # a malformed row: error (one line) | drop (counted, listed in dropped_rows.jsonl)
    max_bad_fraction: float = 0.001  # with drop: more bad rows than this share of a split is an error
    stats: dict[str, PreferenceSplitStats] = field(default_factory=dict)

    required_columns = SIDES
    check_row = staticmethod(_check_row)

    def __post_init__(self) -> None:
        self.init_lightning()
        self.train_set: datasets.Dataset | None = None
        self.val_set: datasets.Dataset | None = None
        self.exact_match: list[dict] = []
        self.pad_id: int | None = None

    def build(self, split: Split, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
        settings = [PREFERENCE_VERSION, split.dataset._fingerprint, tokenizer_fingerprint(tokenizer),
                    self.max_length, self.max_prompt_length, self.bad_rows]
        tokenized = self.tokenize_split(
            split, _tokenize_rows, "preference-tokenize", settings,
            tokenizer=tokenizer, max_length=self.max_length, max_prompt_length=self.max_prompt_length,
            bad_rows=self.bad_rows,
        )
        drops = tokenized["drop"]
        stats = PreferenceSplitStats(
            rows=len(tokenized), dropped_identical=drops.count("identical"), dropped_no_room=drops.count("no_room"),
            bad_rows=reasons(self.record_bad_rows(tokenized["bad"], split)),
        )
        kept = tokenized.filter(
            lambda reasons: [not r for r in reasons], input_columns="drop", batched=True,
            new_fingerprint=fingerprint("preference-keep", *settings),
        )
        if len(kept) == 0:
            raise DataError(
                f"{split.source} split '{split.name}': no pair left (identical chosen/rejected, or no completion token "
                f"within data.max_length={self.max_length} after data.max_prompt_length={self.max_prompt_length})"
            )
        kept = kept.map(
            _finish_rows, batched=True, with_indices=True,
            new_fingerprint=fingerprint("preference-index", *settings), desc=f"Indexing {split.name}",
        )
        stats.pairs, stats.dropped = len(kept), len(tokenized) - len(kept)
        stats.truncated_prompts = sum(kept["prompt_truncated"])
        stats.truncated_completions = sum(kept["chosen_truncated"]) + sum(kept["rejected_truncated"])
        stats.completion_tokens = sum(kept["chosen_length"]) + sum(kept["rejected_length"])
        self.stats[split.name] = stats
        report = log.warning if stats.dropped or stats.truncated_prompts or stats.truncated_completions else log.info
        report(
            "%s split '%s': %d pairs of %d rows; in pairs over data.max_length=%d, %d prompts cut to "
            "data.max_prompt_length=%s (kept their end) and %d completions cut to the length left; dropped %d with "
            "chosen == rejected, %d with no room for a completion",
            split.source, split.name, stats.pairs, stats.rows, self.max_length, stats.truncated_prompts,
            self.max_prompt_length, stats.truncated_completions, stats.dropped_identical, stats.dropped_no_room,
        )
        return kept.select_columns(list(COLUMNS))

    # ---- loaders (see data/base.py) -------------------------------------------------------
    unit = "pairs"

    def collate(self):
        return functools.partial(collate_pairs, pad_id=self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of)

    def train_counts(self) -> list[int]:
        """Chosen completion tokens per pair: the window's count normalises the RPO term (a token mean)."""
        return self.train_set["chosen_length"]

    def train_lengths(self) -> list[int]:
        """``prompt_length + max(chosen_length, rejected_length)`` per pair: the batch's chosen and
        rejected rows are padded to one length (``collate_pairs``)."""
        table = self.train_set.with_format("arrow")
        completion = pc.max_element_wise(table["chosen_length"], table["rejected_length"])
        return pc.add(table["prompt_length"], completion).to_pylist()

    def precompute_dataloader(self, split: str) -> DataLoader:
        """The whole split (``"train"``/``"val"`` or its configured name), unshuffled, for caching the
        reference log-probs by ``index``. Rank-sharded in contiguous blocks of equal size (the last rank
        repeats rows from the start to fill its block, same index, same values) so that every rank
        gathers the same number of rows."""
        sets = {"train": self.train_set, self.train_split: self.train_set, "val": self.val_set,
                "test": self.val_set, self.test_split: self.val_set}
        if split not in sets:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(sets)}")
        world_size, rank, _ = self.world()
        return self.sequential_loader(EqualShard(sets[split].with_format(None), world_size, rank, pad=dict))
