"""Generation shared over processes: each rank takes every ``world``-th unit of work, rank 0 merges.

``distributed.devices`` (processes per node), ``distributed.num_nodes`` and ``distributed.accelerator``
are as in ``train.py``'s trainer. More than one process starts a Lightning ``Fabric`` (DDP): with
``devices=N`` on one machine it starts the other N-1 processes itself; under ``torchrun`` or ``srun``
it joins the ones the launcher made. Each rank's ``hf`` backend then loads its model on its own GPU.

Every rank runs the same collectives in the same order:

1. ``gather(value)`` after each rank's share (its counts, or the error it hit): every rank gets every
   rank's value, so a failure anywhere stops all of them with the same message instead of a hang;
2. ``announce(result)`` after rank 0's merge: the others wait for it (the next stage of a pipeline
   reads the merged files) and raise rank 0's error when it failed.

A rank that dies outright (killed, out of memory) leaves the others waiting at most
``distributed.timeout_s`` (the process group's timeout), after which they fail.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from zephyr_lit.errors import ConfigError, UserInputError

log = logging.getLogger(__name__)
T = TypeVar("T")


class RankFailed(RuntimeError):
    """Another rank (or this one) failed during a shared stage."""


@dataclass
class Ranks:
    """This process's place among the generating processes."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's units: every ``world``-th, starting at ``rank`` (the same split on every rank)."""
        return list(items)[self.rank :: self.world]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (one collective)."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def announce(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (one collective)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def sum_counts(per_rank: Sequence[Mapping[str, int]]) -> dict[str, int]:
    """Counts added up over ranks, keys in first-seen order."""
    out: dict[str, int] = {}
    for counts in per_rank:
        for key, value in counts.items():
            out[key] = out.get(key, 0) + value
    return out


def run_shared(ranks: Ranks, work, *args, **kwargs) -> dict[str, int]:
    """``work(*args, **kwargs) -> counts`` on every rank, then the counts summed over ranks. When any
    rank raised, every rank raises (a ``UserInputError`` keeps its type and message)."""
    if ranks.world == 1:
        return dict(work(*args, **kwargs))
    try:
        outcome: tuple[str, Any] = ("ok", work(*args, **kwargs))
    except UserInputError as error:
        outcome = ("user", f"{error}")
    except Exception as error:  # noqa: BLE001 - passed on so that no rank waits for a dead one
        log.exception("rank %d failed", ranks.rank)
        outcome = ("error", f"rank {ranks.rank}: {type(error).__name__}: {error}")
    outcomes = ranks.gather(outcome)
    for kind, detail in outcomes:
        if kind == "user":
            raise ConfigError(detail)
        if kind == "error":
            raise RankFailed(detail)
    return sum_counts([detail for _, detail in outcomes])


def distributed_problems(section: Mapping) -> list[str]:
    problems = []
    for key in ("devices", "num_nodes"):
        if not isinstance(section.get(key), int) or section[key] < 1:
            problems.append(f"distributed.{key}={section.get(key)!r} must be a positive integer")
    if section.get("timeout_s", 1) <= 0:
        problems.append(f"distributed.timeout_s={section.get('timeout_s')} must be positive")
    return problems


def start_ranks(section: Mapping) -> Ranks:
    """One process (``devices=1, num_nodes=1``): ``Ranks(0, 1)`` and no process group. Otherwise a
    ``Fabric`` DDP launch with ``timeout_s`` as the process group's timeout."""
    devices, nodes = int(section.get("devices", 1)), int(section.get("num_nodes", 1))
    if devices * nodes == 1:
        return Ranks()
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    fabric = Fabric(accelerator=section.get("accelerator", "auto"), devices=devices, num_nodes=nodes,
                    strategy=DDPStrategy(timeout=timedelta(seconds=float(section.get("timeout_s", 1800)))))
    fabric.launch()
    log.info("generation rank %d of %d on %s", fabric.global_rank, fabric.world_size, fabric.device)
    return Ranks(fabric.global_rank, fabric.world_size)


def single_process_only(backend: object, world: int) -> None:
    """vLLM spreads one model over a node's GPUs itself: one process only."""
    if world > 1 and type(backend).__name__ == "VLLMBackend":
        raise ConfigError("the vllm backend runs in one process (tensor_parallel_size spreads it over the GPUs): "
                          "set distributed.devices=1")
