"""What the SFT and DPO modules share: the optimiser and schedule, and the exact-match metric."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from transformers import PreTrainedTokenizerBase

from zephyr_lit.errors import ConfigError
from zephyr_lit.evaluation import exact_match_rate
from zephyr_lit.logprobs import CompletionScores, model_completion_scores
from zephyr_lit.models import ModelSpec
from zephyr_lit.schedule import build_scheduler
from zephyr_lit.zero3 import hf_deepspeed_config, zero3_config


class ChatModule(L.LightningModule):
    """Subclasses build their networks in ``configure_model`` and name the trained one in
    ``trained_model`` (it gets the optimizer, the exact-match generations and the export)."""

    def __init__(
        self,
        model: ModelSpec,
        optimizer: Callable,
        scheduler: str = "cosine",
        warmup_ratio: float = 0.1,
        tokenizer: PreTrainedTokenizerBase | None = None,
        exact_match: list[dict] | None = None,
        exact_match_max_new_tokens: int = 32,
        length_groups: int = 1,
    ) -> None:
        super().__init__()
        self.model_spec = model
        self.optimizer_factory = optimizer
        self.scheduler_name, self.warmup_ratio = scheduler, warmup_ratio
        self.tokenizer = tokenizer
        self.exact_match = exact_match or []
        self.exact_match_max_new_tokens = exact_match_max_new_tokens
        if length_groups < 1:
            raise ConfigError(f"module.length_groups={length_groups}: must be >= 1 (1: one padded pass per batch)")
        self.length_groups = length_groups
        self._hf_deepspeed_config = None  # held while the models live (see zephyr_lit/zero3.py)

    def hold_zero3_loading_config(self) -> None:
        """Call at the top of ``configure_model``: under ZeRO-3, keep an ``HfDeepSpeedConfig`` alive so
        ``from_pretrained`` (run inside ``zero.Init``) loads into the shards and ``generate`` syncs ranks."""
        config = zero3_config(self._trainer)
        if config is not None and self._hf_deepspeed_config is None:
            self._hf_deepspeed_config = hf_deepspeed_config(config)

    @property
    def trained_model(self):
        raise NotImplementedError

    def scores(self, model, batch: dict[str, torch.Tensor]) -> CompletionScores:
        """Log-probs of ``batch``'s labelled tokens under ``model``: the LM head only at those
        positions, and padded rows in up to ``module.length_groups`` passes of similar length
        (one pass under DeepSpeed, where every pass would gather the ZeRO-3 shards again)."""
        groups = self.length_groups
        if groups > 1 and self._trainer is not None and isinstance(self.trainer.strategy, DeepSpeedStrategy):
            groups = 1
        return model_completion_scores(model, batch, max_groups=groups)

    def for_backward(self, loss):
        """The loss to return from ``training_step``. Lightning divides it by ``accumulate_grad_batches``;
        where the strategy accumulates itself (DeepSpeed), the engine divides it once more: undo that."""
        if self.trainer.strategy.handles_gradient_accumulation:
            return loss * self.trainer.accumulate_grad_batches
        return loss

    def log_exact_match(self) -> None:
        """``val/exact_match``: greedy replies to the held-out checkable prompts, compared exactly."""
        if self.exact_match and self.tokenizer is not None:
            rate = exact_match_rate(
                self.trainer, self.trained_model, self.tokenizer, self.exact_match, self.exact_match_max_new_tokens
            )
            self.log("val/exact_match", rate, sync_dist=True)

    def configure_optimizers(self):
        """The configured optimizer over the trained model's parameters; warmup + decay per step."""
        params = [p for p in self.trained_model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = build_scheduler(optimizer, self.scheduler_name, total_steps, self.warmup_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
