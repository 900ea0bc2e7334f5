"""Where the training data stands in its epoch, so that a resumed run continues with the next micro-batch.

``ResumableLoader`` is a ``DataLoader`` over a ``WindowBatchSampler`` that counts the micro-batches it
has handed out in the current epoch. ``state_dict()`` is that position (and the batch geometry it
depends on); after ``load_state_dict(state)``, the iteration of the saved epoch starts past them, and
later epochs start at their beginning. The sampler's order is a function of the seed and the epoch,
so skipping is enough: the skipped rows are not loaded.

Two things make this independent of when Lightning 2.6 calls ``iter()`` and restores state:

- iteration is lazy: ``iter(loader)`` returns a generator whose body (the position check, the sampler,
  the workers) first runs at the first ``next()``, in the first training step, after the checkpoint
  is restored and ``set_epoch`` was called;
- the state is applied by ``zephyr_lit.resume.ExactResume`` in ``on_train_start``: Lightning's own
  restore of loader states runs before the checkpoint's loop state is read whenever
  ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (Lightning issue #20550),
  and then never again. Lightning still calls ``state_dict()`` (the loader is ``_Stateful``), and
  would it call ``load_state_dict`` too, the second call with the same state changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from zephyr_lit.errors import ConfigError


class ResumableLoader(DataLoader):
    """``DataLoader(dataset, batch_sampler=WindowBatchSampler(...), ...)`` that can start mid-epoch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = 0  # micro-batches handed out in the epoch being iterated
        self._resume: dict[str, int] | None = None

    def geometry(self) -> dict[str, int]:
        """What a position means: the same numbers must hold when it is restored."""
        sampler = self.batch_sampler
        return {"micro_batches_per_epoch": len(sampler), "batch_size": sampler.batch_size,
                "world_size": sampler.world_size, "accumulate": sampler.accumulate, "rows": len(sampler.label_counts)}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.batch_sampler.epoch, "micro_batches": self.position, **self.geometry()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = {key: state[key] for key in self.geometry() if key in state}
        now = self.geometry()
        if saved != {key: now[key] for key in saved}:
            changed = ", ".join(f"{key} {saved[key]} -> {now[key]}" for key in saved if saved[key] != now[key])
            raise ConfigError(
                f"the checkpoint's position in the training data does not fit this run ({changed}): resume with "
                "the checkpoint's data, data.batch_size, trainer.devices x trainer.num_nodes and "
                "trainer.accumulate_grad_batches, or start a new run (paths.output_dir, without ckpt_path)"
            )
        self._resume = {"epoch": int(state["epoch"]), "micro_batches": int(state["micro_batches"])}

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        sampler, start = self.batch_sampler, 0
        if self._resume is not None:  # only the first iteration after a restore, and only in its epoch
            if self._resume["epoch"] == sampler.epoch:
                start = self._resume["micro_batches"]
            self._resume = None
        sampler.start_at(start)
        self.position = start
        for batch in super().__iter__():
            self.position += 1
            yield batch
