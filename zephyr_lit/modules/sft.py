"""SFTModule: next-token cross-entropy on the labelled (assistant) tokens of chat data.

The loss of one optimizer step is the mean over every label token of the global batch (all
micro-batches of the accumulation window, on all ranks). Each micro-batch carries its window's
label count (``window_tokens``, from ``WindowBatchSampler``) and contributes
``sum_nll * accumulate * world_size / window_tokens``: Lightning divides by ``accumulate`` and DDP
averages over ranks, so the gradient is that of ``sum over the window of nll / window_tokens``.
"""

from __future__ import annotations

import time

import torch

from zephyr_lit.models import build_model
from zephyr_lit.modules.base import ChatModule


class SFTModule(ChatModule):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.model = None
        self._reset_window()

    @property
    def trained_model(self):
        """The network that gets exported."""
        return self.model

    def configure_model(self) -> None:
        """Build the network here: under DeepSpeed ZeRO-3, Lightning runs this inside ``zero.Init``."""
        self.hold_zero3_loading_config()
        if self.model is None:
            self.model = build_model(self.model_spec)

    # ---- training ---------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        return self.model(**inputs, use_cache=False).logits  # (B, T, V)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll_sum = -self.scores(self.model, batch).logp_sum.sum()
        window_tokens = batch["window_tokens"].clamp(min=1)
        self._window_nll += nll_sum.detach() / window_tokens
        self._window_real_tokens += batch["num_tokens"]
        return self.for_backward(nll_sum * (self.trainer.accumulate_grad_batches * self.trainer.world_size) / window_tokens)

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
        scores = self.scores(self.model, batch)
        nll_sum, count = -scores.logp_sum.sum(), scores.token_count.sum()
        self._val_nll += nll_sum.double()
        self._val_tokens += count.double()

    def on_validation_epoch_end(self) -> None:
        strategy = self.trainer.strategy
        nll = strategy.reduce(self._val_nll, reduce_op="sum")
        tokens = strategy.reduce(self._val_tokens, reduce_op="sum")
        loss = (nll / tokens.clamp(min=1)).float()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/perplexity", torch.exp(loss), sync_dist=True)
        self.log_exact_match()
