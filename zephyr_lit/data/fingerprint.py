"""Stable fingerprints for cached data: same source, tokenizer and settings give the same key."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from transformers import PreTrainedTokenizerBase

# Bump when the tokenisation code changes meaning, so that old caches are not reused.
TOKENIZATION_VERSION = "1"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of everything in the tokenizer that changes ids: vocabulary, merges, specials, template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    digest.update(repr((tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)).encode())
    digest.update(str(tokenizer.chat_template).encode())
    return digest.hexdigest()[:16]


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-serialisable ``parts`` (and the tokenisation code version)."""
    text = json.dumps([TOKENIZATION_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
