"""Callbacks that the fail-safe tests add from the command line (``+callbacks.x._target_=tests.failsafe.hooks.X``).

- ``KillMidSave``: at the save of step ``step``, the writer writes half of its first file, then the
  job is SIGKILLed (single process: itself; several: rank 1 kills the whole process group).
- ``StallRank``: rank ``rank`` stops itself (SIGSTOP) after the forward of step ``step``; its peers wait.
- ``Record``: each rank writes ``rank<r>.json``: the step it started at, its process-group timeout,
  and, on an error, when and what (plus when the process exited).
"""

from __future__ import annotations

import atexit
import io
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch


def write_half_then(data_of: Callable[[object], bytes], kill: Callable[[], None]) -> Callable:
    """A writer ``(obj, target)`` that writes the first half of ``data_of(obj)`` to ``target`` (a path or an
    open file), makes it durable, then calls ``kill()``."""

    def write(obj, target) -> None:
        data = data_of(obj)
        handle = open(target, "wb") if isinstance(target, str | os.PathLike) else target
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
        kill()

    return write


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def kill_this_process() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_the_process_group() -> None:
    """Every rank at once, as a cancelled job: Lightning's ranks and the test's launch share one group."""
    os.killpg(os.getpgid(0), signal.SIGKILL)


class KillMidSave(L.Callback):
    def __init__(self, step: int, out: str) -> None:
        self.step, self.out = step, Path(out)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        if trainer.global_step != self.step:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"killing{trainer.global_rank}").write_text(str(trainer.global_step))
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is None:  # a checkpoint file, written by rank 0 through the CheckpointIO plugin
            trainer.strategy.checkpoint_io.dump = write_half_then(torch_bytes, kill_this_process)
        elif trainer.global_rank == 1:  # DeepSpeed's shards: rank 1's first file half-written, then all die
            engine.checkpoint_engine.save = write_half_then(torch_bytes, kill_the_process_group)


class StallRank(L.Callback):
    def __init__(self, rank: int, step: int, out: str) -> None:
        self.rank, self.step, self.out = rank, step, Path(out)

    def on_before_backward(self, trainer: L.Trainer, pl_module, loss) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "stopped.json").write_text(json.dumps({"pid": os.getpid(), "at": time.time()}))
            os.kill(os.getpid(), signal.SIGSTOP)


def pg_timeout_s() -> float | None:
    """The default process group's timeout in seconds, as its gloo backend holds it."""
    if not torch.distributed.is_initialized():
        return None
    group = torch.distributed.distributed_c10d._get_default_group()
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


class Record(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.facts: dict = {}

    def _write(self, rank: int) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{rank}.json").write_text(json.dumps(self.facts))

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self.facts.update(start_step=trainer.global_step, pg_timeout_s=pg_timeout_s())
        self._write(trainer.global_rank)

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        self.facts.update(failed_at=time.time(), error=f"{type(exception).__name__}: {exception}"[:500])
        self._write(trainer.global_rank)

        def exited() -> None:
            self.facts["exited_at"] = time.time()
            self._write(trainer.global_rank)

        atexit.register(exited)
