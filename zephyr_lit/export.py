"""Atomic Hugging Face export and the ``latest`` pointer to the newest run folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase


def export_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path, state_dict: dict | None = None
) -> Path:
    """Write model (safetensors), tokenizer, chat template and generation config to ``target``.

    ``state_dict`` replaces the model's own weights (a ZeRO-3 model holds only shards: pass
    ``zero3.gathered_state_dict(model)``).

    Everything is written to a temporary sibling folder first and renamed into place, so ``target``
    is never half-written; an existing export is replaced only once the new one is complete.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
    return target


def point_latest(link: Path, run_dir: Path) -> None:
    """Make ``link`` a symlink to ``run_dir`` (relative when possible), replaced atomically."""
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        destination = os.path.relpath(run_dir, link.parent)
    except ValueError:  # another drive
        destination = str(run_dir)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(destination, target_is_directory=True)
    os.replace(tmp, link)
