"""Divergence: what a training step does with a non-finite loss or gradient (``module.nonfinite``).

Two checks, each all-reduced so that every rank decides the same (a rank deciding alone would leave
the others waiting in the next collective):

- the loss, before backward, on every micro-batch (``check_loss``);
- the gradients, before the optimizer step, once per accumulation window (``check_gradients``):
  their global norm, or under DeepSpeed its ZeRO optimizer's own check of the reduced gradient
  partitions (bf16 ZeRO-3 would otherwise apply NaN gradients: it only checks for fp16).

``stop`` (default): at the first non-finite value every rank raises ``DivergenceError`` before the
step is applied or checkpointed; ``run.train`` then writes no export and leaves ``latest`` alone.
``skip``: the window's gradients are dropped (set to ``None``: torch optimizers then leave those
weights and their state untouched), the step is counted, and past ``max_skipped_steps`` skipped steps
the run stops as above. The step counter and the LR schedule still advance. DeepSpeed steps inside its
engine, so ``skip`` is refused there (``zephyr_lit.config``).
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from zephyr_lit.errors import UserInputError
from zephyr_lit.windows import window_ends

POLICIES = ("stop", "skip")


class DivergenceError(UserInputError):
    """Training produced a non-finite loss or gradient and the policy says stop."""


def any_rank(strategy, flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (one all-reduce)."""
    return bool(strategy.reduce(torch.tensor(float(flag), device=device), reduce_op="sum") > 0)


def gradient_norm(parameters) -> torch.Tensor:
    """``||g||_2`` over every gradient (NaN or inf when any element is)."""
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


class NonFiniteGuard:
    """Apply ``policy`` (``stop`` | ``skip``) at the two checks; ``skipped`` counts skipped steps."""

    def __init__(self, policy: str = "stop", max_skipped_steps: int = 10) -> None:
        self.policy, self.max_skipped_steps = policy, max_skipped_steps
        self.skipped = 0
        self._window_bad: str | None = None  # what was non-finite in the current window

    def check_loss(self, module, loss: torch.Tensor) -> None:
        trainer = module.trainer
        if any_rank(trainer.strategy, not bool(torch.isfinite(loss.detach()).all()), loss.device):
            self._bad(trainer, "the loss")

    def check_gradients(self, module, optimizer) -> None:
        """Call in ``on_before_optimizer_step``; acts only when the micro-batch ends its window."""
        trainer = module.trainer
        if not window_ends(trainer):
            return
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            bad = bool(strategy.model.optimizer.has_overflow())  # all-reduced inside DeepSpeed
        else:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            bad = any_rank(strategy, not bool(torch.isfinite(gradient_norm(params))), module.device)
        if bad:
            self._bad(trainer, "the gradient norm")
        if self._window_bad is not None:  # skip: this window's step leaves weights and state alone
            optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self._window_bad = None

    def _bad(self, trainer, what: str) -> None:
        step = trainer.global_step + 1
        if self.policy == "skip" and self.skipped < self.max_skipped_steps:
            self._window_bad = self._window_bad or what
            return
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none saved yet"
        reason = (f"after {self.skipped} skipped steps (module.max_skipped_steps={self.max_skipped_steps})"
                  if self.policy == "skip" else "module.nonfinite=stop")
        raise DivergenceError(
            f"optimizer step {step}: {what} is not finite ({reason}); stopped before the step was applied or "
            f"checkpointed, no export written; last good checkpoint: {checkpoint}. Lower optim.lr or check "
            "the data, then resume with ckpt_path=last, or set module.nonfinite=skip"
        )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped = int(state.get("skipped", 0))
