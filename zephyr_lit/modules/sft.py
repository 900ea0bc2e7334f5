"""SFTModule: next-token cross-entropy on the labelled (assistant) tokens of chat data.

The loss of one optimizer step is the mean over every label token of the global batch (all
micro-batches of the accumulation window, on all ranks). Each micro-batch carries its window's
label count (``window_tokens``, from ``WindowBatchSampler``) and contributes
``sum_nll * accumulate * world_size / window_tokens``: Lightning divides by ``accumulate`` and DDP
averages over ranks, so the gradient is that of ``sum over the window of nll / window_tokens``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import lightning as L
import torch
from transformers import PreTrainedTokenizerBase

from zephyr_lit.evaluation import exact_match_rate
from zephyr_lit.logprobs import summed_token_nll
from zephyr_lit.models import ModelSpec, build_model
from zephyr_lit.schedule import build_scheduler


class SFTModule(L.LightningModule):
    def __init__(
        self,
        model: ModelSpec,
        optimizer: Callable,
        scheduler: str = "cosine",
        warmup_ratio: float = 0.1,
        tokenizer: PreTrainedTokenizerBase | None = None,
        exact_match: list[dict] | None = None,
        exact_match_max_new_tokens: int = 32,
    ) -> None:
        super().__init__()
        self.model_spec = model
        self.optimizer_factory = optimizer
        self.scheduler_name, self.warmup_ratio = scheduler, warmup_ratio
        self.tokenizer = tokenizer
        self.exact_match = exact_match or []
        self.exact_match_max_new_tokens = exact_match_max_new_tokens
        self.model = None
        self._reset_window()

    @property
    def trained_model(self):
        """The network that gets exported."""
        return self.model

    def configure_model(self) -> None:
        """Build the network here: under DeepSpeed ZeRO-3, Lightning runs this inside ``zero.Init``."""
        if self.model is None:
            self.model = build_model(self.model_spec)

    # ---- training ---------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        return self.model(**inputs, use_cache=False).logits  # (B, T, V)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll_sum, _ = summed_token_nll(self(batch), batch["labels"])
        window_tokens = batch["window_tokens"].clamp(min=1)
        self._window_nll += nll_sum.detach() / window_tokens
        self._window_real_tokens += batch["num_tokens"]
        return nll_sum * (self.trainer.accumulate_grad_batches * self.trainer.world_size) / window_tokens

    def _reset_window(self) -> None:
        self._window_nll = torch.zeros((), device=self.device)
        self._window_real_tokens = torch.zeros((), dtype=torch.long, device=self.device)
        self._window_started = time.perf_counter()

    def on_train_start(self) -> None:
        self._reset_window()

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log once per optimizer step: the global-batch mean loss, the lr, real tokens per second."""
        elapsed = time.perf_counter() - self._window_started
        self.log("train/loss", self._window_nll.to(self.device), reduce_fx="sum", sync_dist=True, prog_bar=True)
        tokens_per_s = self._window_real_tokens.to(self.device, torch.float32) / max(elapsed, 1e-9)
        self.log("train/tokens_per_s", tokens_per_s, reduce_fx="sum", sync_dist=True)
        self.log("train/lr", optimizer.param_groups[0]["lr"])
        self._reset_window()

    # ---- validation -------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_nll = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_tokens = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        nll_sum, count = summed_token_nll(self(batch), batch["labels"])
        self._val_nll += nll_sum.double()
        self._val_tokens += count.double()

    def on_validation_epoch_end(self) -> None:
        strategy = self.trainer.strategy
        nll = strategy.reduce(self._val_nll, reduce_op="sum")
        tokens = strategy.reduce(self._val_tokens, reduce_op="sum")
        loss = (nll / tokens.clamp(min=1)).float()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/perplexity", torch.exp(loss), sync_dist=True)
        if self.exact_match and self.tokenizer is not None:
            rate = exact_match_rate(self.trainer, self.model, self.tokenizer, self.exact_match, self.exact_match_max_new_tokens)
            self.log("val/exact_match", rate, sync_dist=True)

    # ---- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = build_scheduler(optimizer, self.scheduler_name, total_steps, self.warmup_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
