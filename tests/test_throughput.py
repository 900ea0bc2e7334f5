"""The Throughput callback: warm-up batches are not timed; rows and real tokens are counted."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from zephyr_lit.callbacks import Throughput


def test_counts_rows_and_real_tokens_after_warmup_only():
    callback = Throughput(warmup=2)
    module = SimpleNamespace(device=torch.device("cpu"))
    batch = {"input_ids": torch.zeros(4, 16, dtype=torch.long), "num_tokens": torch.tensor(50)}
    for index in range(5):
        callback.on_train_batch_start(None, module, batch, index)
        time.sleep(0.01)
        callback.on_train_batch_end(None, module, None, batch, index)
    callback.on_train_end(None, module)
    stats = callback.stats
    assert stats["timed_batches"] == 3
    elapsed = 3 * 4 / stats["samples_per_s"]  # 3 timed batches of 4 rows
    assert 0.03 <= elapsed < 0.5
    assert stats["tokens_per_s"] * elapsed == pytest.approx(150)  # 3 x 50 real tokens, not 3 x 64
    assert stats["peak_memory_gib"] > 0.05  # this process's peak RSS
