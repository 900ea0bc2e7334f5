"""Exact resume: what a checkpoint holds beyond Lightning's own state, and when it is put back.

Lightning saves the weights, the optimizer and scheduler states and the loop counters. ``ExactResume``
adds, under ``checkpoint["zephyr_resume"]``:

- ``data``: the training loader's position in its epoch (``zephyr_lit/data/position.py``), restored in
  ``on_train_start``, so the resumed run continues with the micro-batch after the checkpoint;
- ``rng``: every rank's RNG states (torch CPU and CUDA, numpy, python), gathered to all ranks when the
  checkpoint is written (rank 0 writes it) and restored on each rank just before its first training
  micro-batch, so dropout draws the masks the uninterrupted run drew. Nothing between a save and the
  next micro-batch draws from these generators (the loaders have their own), so restoring them as late
  as possible makes the resumed run independent of what it does before training (validation, the
  reference precompute).

Checkpoints are only written at accumulation-window ends (``zephyr_lit.callbacks.WindowCheckpoint``),
so no half-accumulated gradient is ever lost.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from zephyr_lit.data.position import ResumableLoader
from zephyr_lit.errors import ConfigError

log = logging.getLogger(__name__)

KEY = "zephyr_resume"


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch CPU, the current CUDA device's (when CUDA is in use), numpy, python;
    in types that ``torch.load(weights_only=True)`` (Lightning's default) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, by rank (one collective when several ranks run)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def train_loader(trainer: L.Trainer) -> ResumableLoader | None:
    loader = trainer.train_dataloader
    return loader if isinstance(loader, ResumableLoader) else None


class ExactResume(L.Callback):
    """Save the data position and every rank's RNG states with each checkpoint; put them back on resume.

    ``trainer.save_checkpoint`` runs on every rank (Lightning requires it), and so does the gather here."""

    def __init__(self) -> None:
        self._data: dict[str, Any] | None = None
        self._rng: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        loader = train_loader(trainer)
        checkpoint[KEY] = {"data": None if loader is None else loader.state_dict(), "rng": gather_objects(rng_state())}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get(KEY)
        if state is None:
            log.warning("the checkpoint holds no data position or RNG state: a resume mid-epoch restarts "
                        "that epoch's data order")
            return
        if len(state["rng"]) != trainer.world_size:
            raise ConfigError(
                f"the checkpoint was written by {len(state['rng'])} ranks and this run has {trainer.world_size}: "
                "resume on as many ranks (trainer.devices x trainer.num_nodes), or start a new run"
            )
        self._data, self._rng = state["data"], state["rng"][trainer.global_rank]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = train_loader(trainer)
        if self._data is not None and loader is not None:
            loader.load_state_dict(self._data)
            log.info("resuming epoch %d at micro-batch %d of %d", self._data["epoch"], self._data["micro_batches"],
                     len(loader))
        self._data = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None
