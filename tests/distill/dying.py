"""Backends that SIGKILL their own process at their ``die_at``-th ``generate`` call, once: the
``marker`` file records that the kill happened, so the rerun (same config) goes through."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from zephyr_lit.distill.scripted import RuleJudge, ScriptedBackend


class DyingOnce:
    def __init__(self, die_at: int, marker: str) -> None:
        self.die_at, self.marker, self.calls = die_at, Path(marker), 0

    def maybe_die(self) -> None:
        self.calls += 1
        if self.calls == self.die_at and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


class DyingScripted(ScriptedBackend):
    def __init__(self, persona: str, die_at: int, marker: str) -> None:
        super().__init__(persona)  # the same name as the plain persona
        self.death = DyingOnce(die_at, marker)

    def generate(self, requests):
        self.death.maybe_die()
        return super().generate(requests)


class DyingJudge(RuleJudge):
    def __init__(self, die_at: int, marker: str) -> None:
        super().__init__()
        self.death = DyingOnce(die_at, marker)

    def generate(self, requests):
        self.death.maybe_die()
        return super().generate(requests)


class DyingHF:
    """An ``HFBackend`` that SIGKILLs its process at its ``die_at``-th call when it runs on rank ``rank``
    (``RANK`` / ``LOCAL_RANK`` in the environment), once (``marker``)."""

    def __new__(cls, die_at: int, marker: str, rank: int = 1, **hf):
        from zephyr_lit.distill.backends import HFBackend

        backend = HFBackend(**hf)
        here = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
        if here == rank:
            death, generate = DyingOnce(die_at, marker), backend.generate

            def dying_generate(requests):
                death.maybe_die()
                return generate(requests)

            backend.generate = dying_generate
        return backend
