"""Atomic Hugging Face export (any folder written whole through ``write_folder``) and the ``latest``
pointer to the newest run folder."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase


def export_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path, state_dict: dict | None = None
) -> Path:
    """Write model (safetensors), tokenizer, chat template and generation config to ``target``.

    The export is for inference: ``use_cache: true`` in both ``config.json`` and
    ``generation_config.json`` (training with gradient checkpointing turns the live model's cache
    off), and the tokenizer's BOS/EOS/pad ids in ``generation_config.json``. The live model's config
    and generation config are left exactly as they were.

    ``state_dict`` replaces the model's own weights (a ZeRO-3 model holds only shards: pass
    ``zero3.gathered_state_dict(model)``).

    Everything is written to a temporary sibling folder first and renamed into place, so ``target``
    is never half-written; an existing export is replaced only once the new one is complete.
    """

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(folder)

    with inference_configs(model, tokenizer):
        return write_folder(target, write)


def write_folder(target: Path, write: Callable[[Path], object]) -> Path:
    """``write(folder)`` fills a temporary sibling folder, which is then renamed to ``target``: ``target``
    is never half-written, and an existing one is replaced only once the new one is complete."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
    return target


@contextmanager
def inference_configs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    """Within the block, ``model`` carries the configs an inference export should save; on exit
    (even on an error) its own are back, so a caller that keeps training sees no change."""
    use_cache, generation_config = model.config.use_cache, model.generation_config
    # The config is shared with the submodules (model.model.config is the same object): flip one
    # field and put it back. The generation config is the model's alone: save a copy.
    generation = copy.deepcopy(generation_config)
    generation.use_cache = True
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    model.config.use_cache = True
    model.generation_config = generation
    try:
        yield
    finally:
        model.config.use_cache = use_cache
        model.generation_config = generation_config


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
