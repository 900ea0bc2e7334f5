"""Loaders shared by the SFT and preference data modules: rank shards and the global batch check."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from zephyr_lit.checkpointing import atomic_write
from zephyr_lit.data.exact_match import load_exact_match
from zephyr_lit.data.fingerprint import fingerprint
from zephyr_lit.data.load import Split, load_split
from zephyr_lit.data.position import ResumableLoader
from zephyr_lit.data.sampler import WindowBatchSampler, WindowedDataset
from zephyr_lit.data.validate import bad_row_report, require_columns
from zephyr_lit.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class ShardedDataModule(L.LightningDataModule):
    """Subclasses set ``train_set``/``val_set`` in ``prepare`` and provide ``collate()``,
    ``train_counts()`` (what the sampler sums per window), ``train_lengths()`` (each row's padded
    length, for ``group_by_length``) and ``unit`` (what one row is)."""

    unit = "rows"
    path: str
    train_split: str
    batch_size: int
    eval_batch_size: int | None
    num_workers: int
    shuffle: bool
    seed: int
    group_by_length: bool
    group_mega_batches: int
    prepare_data_per_node: bool
    global_batch_size: int | None
    train_set: datasets.Dataset | None
    val_set: datasets.Dataset | None

    required_columns: tuple[str, ...] = ()
    cache_dir: str | None
    max_train_samples: int | None
    max_eval_samples: int | None
    exact_match_path: str | None
    bad_rows: str
    max_bad_fraction: float

    def collate(self) -> Callable:
        raise NotImplementedError

    @staticmethod
    def check_row(row: dict, at: str) -> None:
        """Explains a row that Arrow cannot read (see ``load_split``)."""

    def build(self, split: Split, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
        """Check, tokenise (cached by fingerprint) and filter one loaded split."""
        raise NotImplementedError

    # ---- data work, before any model exists -------------------------------------------------
    def tokenize_split(self, split: Split, row_fn: Callable, kind: str, settings: list, **kwargs) -> datasets.Dataset:
        """``split`` mapped in batches through ``row_fn(rows, indices, source=, split=, **kwargs)``; the
        result is cached by ``datasets`` under a fingerprint of ``kind`` and ``settings``."""
        return split.dataset.map(
            functools.partial(_counted, row_fn=row_fn, kind=kind, source=split.source, split=split.name, **kwargs),
            batched=True,
            with_indices=True,
            remove_columns=split.dataset.column_names,
            num_proc=self.num_proc,
            new_fingerprint=fingerprint(kind, *settings),
            desc=f"Tokenising {split.name}",
        )

    def prepare(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Everything now: ``use_tokenizer`` then ``tokenize``."""
        self.use_tokenizer(tokenizer)
        self.tokenize()

    def use_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Take the tokenizer and load the exact-match prompts (small: every process reads them)."""
        self.tokenizer, self.pad_id = tokenizer, tokenizer.pad_token_id
        if self.exact_match_path:
            self.exact_match = load_exact_match(self.exact_match_path)

    def tokenize(self) -> None:
        """Load, check and tokenise both splits. ``datasets`` caches the result by fingerprint, so a
        second call (another process, a later run) reads the cache instead of tokenising again."""
        self.dropped_rows = []
        self.train_set = self.build(self.load(self.train_split, self.max_train_samples), self.tokenizer)
        self.val_set = self.build(self.load(self.test_split, self.max_eval_samples), self.tokenizer)
        if self.bad_rows == "drop" and self.dropped_rows_path is not None and self.is_first_rank():
            write_jsonl(self.dropped_rows_path, self.dropped_rows)

    def record_bad_rows(self, problems: list[str], split: Split) -> list[dict]:
        """Called by ``build``: the split's bad rows (``data.bad_rows=drop``), checked against
        ``data.max_bad_fraction`` and kept for ``dropped_rows.jsonl``."""
        bad = bad_row_report(problems, len(problems), self.max_bad_fraction, split.source, split.name)
        if bad:
            log.warning("%s split '%s': dropped %d malformed rows of %d (data.bad_rows=drop; listed in %s)",
                        split.source, split.name, len(bad), len(problems), self.dropped_rows_path)
        self.dropped_rows += bad
        return bad

    def is_first_rank(self) -> bool:
        trainer = self.trainer
        return trainer.is_global_zero if trainer is not None else int(os.environ.get("RANK", "0")) == 0

    # Lightning runs prepare_data on one process per node (data.prepare_data_per_node=true, for a
    # node-local cache) or on one process in all (false, for a cache on shared storage) while the
    # others wait at a barrier; then setup on every process, which reads what was prepared. A run of
    # one process has tokenised already (zephyr_lit.run.prepare_run), before any trainer exists.
    def prepare_data(self) -> None:
        if self.train_set is None:
            self.tokenize()

    def setup(self, stage: str) -> None:
        if self.train_set is None:
            self.tokenize()

    def init_lightning(self) -> None:
        """``LightningDataModule.__init__`` for the dataclass subclasses, keeping the configured
        ``prepare_data_per_node`` (Lightning's constructor resets it)."""
        per_node = self.prepare_data_per_node
        L.LightningDataModule.__init__(self)
        self.prepare_data_per_node = per_node
        self.tokenizer = None
        self.dropped_rows: list[dict] = []
        self.dropped_rows_path: Path | None = None  # run.prepare_run: <output_dir>/dropped_rows.jsonl

    def load(self, split: str, limit: int | None) -> Split:
        """One split, its required columns checked, cut to ``limit`` rows when set."""
        loaded = load_split(self.path, split, self.cache_dir, row_check=self.check_row)
        require_columns(loaded.dataset.column_names, self.required_columns, loaded.source, split)
        if limit is not None and limit < len(loaded.dataset):
            loaded.dataset = loaded.dataset.select(range(limit))
        return loaded

    @property
    def fingerprint(self) -> str:
        """What the tokenised train and val rows are: a hash of their cache fingerprints, which cover
        the source rows, the tokenizer and every tokenisation and truncation setting."""
        return fingerprint("splits", self.train_set._fingerprint, self.val_set._fingerprint)

    def summary_stats(self) -> dict[str, dict]:
        return {name: vars(stats) for name, stats in self.stats.items()}

    def train_counts(self) -> Sequence[int]:
        raise NotImplementedError

    def train_lengths(self) -> Sequence[int]:
        """Each training row's padded length: the tokens it makes its batch pad to."""
        raise NotImplementedError

    def world(self) -> tuple[int, int, int]:
        """``(world_size, rank, accumulate_grad_batches)``; ``(1, 0, 1)`` outside a trainer."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0, 1
        return trainer.world_size, trainer.global_rank, trainer.accumulate_grad_batches

    def check_global_batch_size(self) -> int:
        """``data.batch_size x world size x trainer.accumulate_grad_batches``, checked against
        ``data.global_batch_size`` when that is set, and logged."""
        world_size, _, accumulate = self.world()
        actual = self.batch_size * world_size * accumulate
        devices = getattr(self.trainer, "num_devices", world_size)
        nodes = getattr(self.trainer, "num_nodes", 1)
        product = (f"data.batch_size={self.batch_size} x world size {world_size} (trainer.devices={devices} x "
                   f"trainer.num_nodes={nodes}) x trainer.accumulate_grad_batches={accumulate} = {actual}")
        if self.global_batch_size is not None and actual != self.global_batch_size:
            raise ConfigError(
                f"data.global_batch_size={self.global_batch_size} but {product} {self.unit} per optimizer step; "
                "change data.batch_size, trainer.devices, trainer.num_nodes or trainer.accumulate_grad_batches "
                "(or set data.global_batch_size=null)"
            )
        log.info("global batch: %s %s per optimizer step%s", product, self.unit,
                 "" if self.global_batch_size is None else " (= data.global_batch_size)")
        return actual

    def train_dataloader(self) -> DataLoader:
        self.check_global_batch_size()
        world_size, rank, accumulate = self.world()
        sampler = WindowBatchSampler(
            self.train_counts(), self.batch_size, accumulate, world_size, rank, self.shuffle, self.seed,
            lengths=self.train_lengths() if self.group_by_length else None,
            mega_batches=self.group_mega_batches,
        )
        if len(sampler) == 0:
            raise DataError(
                f"{self.path} split '{self.train_split}': {len(self.train_set)} {self.unit} are fewer than one "
                f"global micro-batch (data.batch_size={self.batch_size} x {world_size} ranks)"
            )
        return ResumableLoader(
            WindowedDataset(self.train_set.with_format(None)),
            batch_sampler=sampler,
            collate_fn=self.collate(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=self.loader_generator(),
            worker_init_fn=leave_sigterm_to_the_trainer,
        )

    def loader_generator(self) -> torch.Generator:
        """A loader's own generator (for its workers' seeds): left alone, each ``iter()`` would draw from
        the global RNG, and a validation would then change the dropout masks of the steps after it."""
        return torch.Generator().manual_seed(self.seed)

    def val_dataloader(self) -> DataLoader:
        """This rank's contiguous block of the validation rows, padded to the same length on every rank
        (so every rank runs the same number of batches and collectives); padding counts in no metric."""
        world_size, rank, _ = self.world()
        return self.sequential_loader(EqualShard(self.val_set.with_format(None), world_size, rank, self.uncounted))

    @staticmethod
    def uncounted(row: dict) -> dict:
        """A padding copy of ``row`` that counts in no metric: ``counted=False`` (subclasses also blank
        what the metrics read)."""
        return dict(row, counted=False)

    def sequential_loader(self, dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size or self.batch_size,
            collate_fn=self.collate(),
            num_workers=self.num_workers,
            generator=self.loader_generator(),
            worker_init_fn=leave_sigterm_to_the_trainer,
        )


def leave_sigterm_to_the_trainer(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM: SLURM signals every process of a task, and a worker that died
    of it would end the main process ("worker exited unexpectedly") before it could save its checkpoint
    (``zephyr_lit/preemption.py``). Workers still end with the main process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """``rows`` as JSON lines at ``path``, atomically (``zephyr_lit.checkpointing.atomic_write``)."""
    with atomic_write(path) as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))


TOKENIZED_ROWS: dict[str, int] = {}  # rows tokenised by this process, per kind (not by num_proc workers)


def _counted(batch: dict, indices: list[int], *, row_fn: Callable, kind: str, **kwargs) -> dict:
    TOKENIZED_ROWS[kind] = TOKENIZED_ROWS.get(kind, 0) + len(indices)
    return row_fn(batch, indices, **kwargs)


class EqualShard(Dataset):
    """Rank ``rank``'s contiguous block of ``ceil(n / world_size)`` rows of ``dataset``: real rows first
    (``real_indices``), then, where the block runs past the end, ``pad(row)`` copies of rows from the
    start. Every rank's shard has the same length."""

    def __init__(self, dataset, world_size: int, rank: int, pad: Callable[[dict], dict]) -> None:
        self.dataset, self.pad = dataset, pad
        n = len(dataset)
        per_rank = -(-n // world_size)
        self.positions = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.real_indices = [i for i in self.positions if i < n]
        self.size = n

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict:
        position = self.positions[i]
        row = dict(self.dataset[position % self.size])
        return row if position < self.size else self.pad(row)
