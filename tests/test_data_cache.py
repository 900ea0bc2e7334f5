"""Tokenisation runs through datasets.map with a stable fingerprint: a second run reads the cache."""

from hydra.utils import instantiate

import zephyr_lit.data.sft as sft_data
from zephyr_lit.models import load_tokenizer


def prepared(cfg):
    datamodule = instantiate(cfg.data)
    datamodule.prepare(load_tokenizer(instantiate(cfg.model)))
    return datamodule


def test_second_run_hits_the_tokenisation_cache(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(f"data.cache_dir={tmp_path / 'cache'}", "data.max_train_samples=null")
    first = prepared(cfg)
    files = [f["filename"] for f in first.train_set.cache_files]
    assert files and all(str(tmp_path / "cache") in f for f in files)

    calls = []
    real = sft_data.tokenize_conversation
    monkeypatch.setattr(sft_data, "tokenize_conversation", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = prepared(cfg)
    assert calls == []  # nothing tokenised again
    assert [f["filename"] for f in second.train_set.cache_files] == files
    assert second.train_set["input_ids"] == first.train_set["input_ids"]

    changed = prepared(make_cfg(f"data.cache_dir={tmp_path / 'cache'}", "data.max_train_samples=null",
                                "data.max_length=64"))
    assert calls  # a setting that changes the tokens changes the fingerprint
    assert [f["filename"] for f in changed.train_set.cache_files] != files
