"""The dSFT data module: chat rows (UltraChat schema) -> validated, tokenised, optionally packed batches.

``prepare(tokenizer)`` does all the data work (load, check every row, tokenise through
``datasets.map`` with a stable fingerprint so a second run reuses the Arrow cache) and is called
before any model is built, so bad data fails fast.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import datasets
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from zephyr_lit.data.base import ShardedDataModule
from zephyr_lit.data.collate import pad_batch
from zephyr_lit.data.fingerprint import fingerprint, tokenizer_fingerprint
from zephyr_lit.data.load import Split
from zephyr_lit.data.tokenize import IGNORE_INDEX, pack_sequences, tokenize_conversation
from zephyr_lit.data.validate import check_messages, reasons, row_problem, where
from zephyr_lit.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class SplitStats:
    """What happened to one split's rows: kept, truncated and dropped (no label left after truncation)."""

    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    label_tokens: int = 0
    bad_rows: dict[str, int] = field(default_factory=dict)  # data.bad_rows=drop: dropped, by reason


def _tokenize_rows(batch: dict, indices: list[int], *, tokenizer, max_length, assistant_only_loss, bad_rows,
                   source, split):
    out: dict[str, list] = {"input_ids": [], "labels": [], "num_labels": [], "truncated": [], "bad": []}
    for messages, index in zip(batch["messages"], indices):
        problem = row_problem(lambda: check_messages(messages, where(source, split, index)), bad_rows, index)
        out["bad"].append(problem)
        if problem:
            for name, empty in (("input_ids", []), ("labels", []), ("num_labels", 0), ("truncated", False)):
                out[name].append(empty)
            continue
        tokens = tokenize_conversation(messages, tokenizer, max_length, assistant_only_loss)
        out["input_ids"].append(tokens.input_ids)
        out["labels"].append(tokens.labels)
        out["num_labels"].append(sum(label != IGNORE_INDEX for label in tokens.labels))
        out["truncated"].append(tokens.truncated)
    return out


def _pack_rows(batch: dict, *, max_length: int) -> dict:
    rows = pack_sequences(batch["input_ids"], batch["labels"], max_length)
    rows["num_labels"] = [sum(label != IGNORE_INDEX for label in labels) for labels in rows["labels"]]
    return rows


def _check_row(row: dict, at: str) -> None:
    check_messages(row.get("messages"), at)


@dataclass(eq=False)
class SFTDataModule(ShardedDataModule):
    """Config fields mirror ``conf/data/*.yaml``; see the README for their meaning."""

    path: str
    train_split: str = "train_sft"
    test_split: str = "test_sft"
    max_length: int = 2048
    batch_size: int = 8
    eval_batch_size: int | None = None
    assistant_only_loss: bool = True
    packing: bool = False
    pad_to_multiple_of: int | None = 8
    attn_implementation: str = "sdpa"  # the model's: packed rows are laid out for it (see data/collate.py)
    num_proc: int | None = None
    num_workers: int = 0
    cache_dir: str | None = None
    shuffle: bool = True
    seed: int = 42
    group_by_length: bool = False  # batches of rows of similar length (see WindowBatchSampler)
    group_mega_batches: int = 50   # global micro-steps per length-sorted chunk
    prepare_data_per_node: bool = True  # tokenise once per node (false: once in all, for a shared cache)
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    exact_match_path: str | None = None
    global_batch_size: int | None = None
    bad_rows: str = "error"          # a malformed row: error (one line) | drop (counted, listed in dropped_rows.jsonl)
    max_bad_fraction: float = 0.001  # with drop: more bad rows than this share of a split is an error
    stats: dict[str, SplitStats] = field(default_factory=dict)

    required_columns = ("messages",)
    check_row = staticmethod(_check_row)

    def __post_init__(self) -> None:
        self.init_lightning()
        self.train_set: datasets.Dataset | None = None
        self.val_set: datasets.Dataset | None = None
        self.exact_match: list[dict] = []
        self.pad_id: int | None = None

    def build(self, split: Split, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
        settings = [split.dataset._fingerprint, tokenizer_fingerprint(tokenizer), self.max_length, self.assistant_only_loss,
                    self.bad_rows]
        tokenized = self.tokenize_split(
            split, _tokenize_rows, "sft-tokenize", settings,
            tokenizer=tokenizer, max_length=self.max_length, assistant_only_loss=self.assistant_only_loss,
            bad_rows=self.bad_rows,
        )
        bad = self.record_bad_rows(tokenized["bad"], split)
        stats = SplitStats(rows=len(tokenized), truncated=sum(tokenized["truncated"]), bad_rows=reasons(bad))
        kept = tokenized.filter(
            lambda n: [count > 0 for count in n], input_columns="num_labels", batched=True,
            new_fingerprint=fingerprint("sft-keep", *settings),
        )
        stats.dropped = len(tokenized) - len(kept) - len(bad)  # bad rows have no label either
        if len(kept) == 0:
            raise DataError(f"{split.source} split '{split.name}': no row has a trainable token within data.max_length={self.max_length}")
        if self.packing:
            kept = kept.map(
                functools.partial(_pack_rows, max_length=self.max_length),
                batched=True,
                batch_size=1000,
                remove_columns=kept.column_names,
                new_fingerprint=fingerprint("sft-pack", *settings),
                desc=f"Packing {split.name}",
            )
        stats.label_tokens = sum(kept["num_labels"])
        self.stats[split.name] = stats
        if stats.truncated or stats.dropped:
            log.warning(
                "%s split '%s': %d of %d conversations longer than data.max_length=%d were truncated; "
                "%d with no assistant token left were dropped",
                split.source, split.name, stats.truncated, stats.rows, self.max_length, stats.dropped,
            )
        return kept.select_columns([c for c in ("input_ids", "labels", "position_ids", "num_labels") if c in kept.column_names])

    # ---- loaders (see data/base.py) -------------------------------------------------------
    unit = "sequences"

    def collate(self):
        return functools.partial(
            pad_batch, pad_id=self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of,
            attn_implementation=self.attn_implementation,
        )

    @staticmethod
    def uncounted(row: dict) -> dict:
        """A validation padding row: the same tokens, no label (it adds nothing to the loss or its count)."""
        return dict(row, labels=[IGNORE_INDEX] * len(row["labels"]), counted=False)

    def train_counts(self) -> list[int]:
        return self.train_set["num_labels"]  # the window's label tokens normalise the loss

    def train_lengths(self) -> list[int]:
        """``len(input_ids)`` of each (possibly packed) row, read from Arrow without decoding the ids."""
        return pc.list_value_length(self.train_set.with_format("arrow")["input_ids"]).to_pylist()
