"""What the SFT and DPO modules share: the trained network (with or without an adapter), the optimiser
and schedule, and the exact-match metric."""

from __future__ import annotations

import time
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from transformers import PreTrainedTokenizerBase

from zephyr_lit.adapters import AdapterSpec, build_trained_model, check_holds, keep_only, trainable_names
from zephyr_lit.evaluation import exact_match_rate
from zephyr_lit.logprobs import CompletionScores, model_completion_scores
from zephyr_lit.metric_sums import MetricSums
from zephyr_lit.models import ModelSpec
from zephyr_lit.nonfinite import NonFiniteGuard
from zephyr_lit.schedule import build_scheduler
from zephyr_lit.windows import align_windows, mark_boundary, window_ends
from zephyr_lit.zero3 import hf_deepspeed_config, zero3_config

PROGRESS_BAR = ("loss", "rewards/accuracies")


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
        exact_match_batch_size: int = 32,
        length_groups: int = 1,
        nonfinite: str = "stop",
        max_skipped_steps: int = 10,
        adapter: AdapterSpec | None = None,
    ) -> None:
        super().__init__()
        self.model_spec = model
        self.adapter = adapter if adapter is not None and adapter.enabled else None  # peft=lora|qlora
        self.optimizer_factory = optimizer
        self.scheduler_name, self.warmup_ratio = scheduler, warmup_ratio
        self.tokenizer = tokenizer
        self.exact_match = exact_match or []
        self.exact_match_max_new_tokens = exact_match_max_new_tokens
        self.exact_match_batch_size = exact_match_batch_size  # values checked in zephyr_lit/config.py
        self.length_groups = length_groups
        self.nonfinite = NonFiniteGuard(nonfinite, max_skipped_steps)  # see zephyr_lit/nonfinite.py
        self._hf_deepspeed_config = None  # held while the models live (see zephyr_lit/zero3.py)
        self.train_sums = MetricSums()  # this accumulation window's, logged once when it ends
        self.val_sums = MetricSums()  # this validation epoch's
        self._window_started = time.perf_counter()

    def hold_zero3_loading_config(self) -> None:
        """Call at the top of ``configure_model``: under ZeRO-3, keep an ``HfDeepSpeedConfig`` alive so
        ``from_pretrained`` (run inside ``zero.Init``) loads into the shards and ``generate`` syncs ranks."""
        config = zero3_config(self._trainer)
        if config is not None and self._hf_deepspeed_config is None:
            self._hf_deepspeed_config = hf_deepspeed_config(config)

    @property
    def hf_deepspeed_config(self):
        """The ``HfDeepSpeedConfig`` held under ZeRO-3 (None otherwise)."""
        return self._hf_deepspeed_config

    @property
    def trained_model(self):
        raise NotImplementedError

    def build_trained_model(self) -> torch.nn.Module:
        """The start model, or with ``peft.*`` the start model frozen plus a new trainable adapter."""
        return build_trained_model(self.model_spec, self.adapter)

    def scores(self, model, batch: dict[str, torch.Tensor]) -> CompletionScores:
        """Log-probs of ``batch``'s labelled tokens under ``model``: the LM head only at those
        positions, and padded rows in up to ``module.length_groups`` passes of similar length
        (one pass under DeepSpeed, where every pass would gather the ZeRO-3 shards again)."""
        groups = self.length_groups
        if groups > 1 and self._trainer is not None and isinstance(self.trainer.strategy, DeepSpeedStrategy):
            groups = 1
        return model_completion_scores(model, batch, max_groups=groups)

    # ---- accumulation windows (see zephyr_lit/windows.py) ------------------------------------
    def setup(self, stage: str) -> None:
        """With an adapter, checkpoints hold the adapter alone (DeepSpeed: ``exclude_frozen_parameters``)
        and loading one is not strict: ``configure_model`` rebuilt the frozen base from the start weights."""
        align_windows(self.trainer)
        if self.adapter is not None:
            self.strict_loading = False
            if isinstance(self.trainer.strategy, DeepSpeedStrategy):
                self.trainer.strategy.exclude_frozen_parameters = True

    def on_train_start(self) -> None:
        self._window_started = time.perf_counter()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        mark_boundary(self.trainer)

    def for_backward(self, window_share: torch.Tensor) -> torch.Tensor:
        """The loss to return from ``training_step``, given this micro-batch's share of its window's loss
        (its rows' summed loss over the whole window's count, all ranks): Lightning divides the returned
        loss by ``accumulate_grad_batches``, DDP and DeepSpeed average gradients over the ranks, and
        DeepSpeed divides by ``accumulate_grad_batches`` once more. The gradient summed over the window
        is then that of the window's loss, also for an epoch's shorter last window. A non-finite share
        stops the run or marks the window's step to be skipped (``module.nonfinite``), on every rank."""
        self.nonfinite.check_loss(self, window_share)
        trainer = self.trainer
        scale = trainer.accumulate_grad_batches * trainer.world_size
        if trainer.strategy.handles_gradient_accumulation:
            scale *= trainer.accumulate_grad_batches
        return window_share * scale

    def on_before_optimizer_step(self, optimizer) -> None:
        self.nonfinite.check_gradients(self, optimizer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["zephyr_nonfinite"] = self.nonfinite.state_dict()
        if self.adapter is not None and "state_dict" in checkpoint:
            keep_only(checkpoint["state_dict"], trainable_names(self))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """(DeepSpeed restores the weights itself and hands over no ``state_dict`` here.)"""
        self.nonfinite.load_state_dict(checkpoint.get("zephyr_nonfinite", {}))
        if self.adapter is not None and checkpoint.get("state_dict") is not None:
            check_holds(checkpoint["state_dict"], trainable_names(self))

    def window_metrics(self, means: dict[str, float], stage: str) -> dict[str, float]:
        """The ``train/`` or ``val/`` (``stage``) metrics from the reduced means (subclasses combine terms)."""
        return means

    def log_window(self, batch: dict[str, torch.Tensor]) -> None:
        """Call at the end of ``training_step``: counts this micro-batch's real tokens and, when it ends
        its window, logs ``train/*`` once for the whole window (all micro-batches, all ranks),
        ``train/tokens_per_s`` (all ranks' real tokens over the window's wall time) and ``train/lr``."""
        self.train_sums.add("tokens", batch["num_tokens"], 0)
        if not window_ends(self.trainer):
            return
        reduced = self.train_sums.reduce(self.trainer.strategy, self.device)
        tokens, _ = reduced.pop("tokens")
        means = {name: total / count if count else 0.0 for name, (total, count) in reduced.items()}
        now = time.perf_counter()
        metrics = self.window_metrics(means, "train") | {"tokens_per_s": tokens / max(now - self._window_started, 1e-9)}
        self._window_started = now
        for name, value in metrics.items():
            self.log(f"train/{name}", value, prog_bar=name in PROGRESS_BAR)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    # ---- validation ------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.val_sums = MetricSums()

    def on_validation_epoch_end(self) -> None:
        """``val/*``: the means over every counted row of the whole validation set, then exact match."""
        metrics = self.window_metrics(self.val_sums.means(self.trainer.strategy, self.device), "val")
        for name, value in metrics.items():
            self.log(f"val/{name}", value, prog_bar=name in PROGRESS_BAR)
        self.log_exact_match()
        self._window_started = time.perf_counter()  # the window's throughput leaves validation out

    def log_exact_match(self) -> None:
        """``val/exact_match``: greedy replies to the held-out checkable prompts, compared exactly."""
        if self.exact_match and self.tokenizer is not None:
            rate = exact_match_rate(
                self.trainer, self.trained_model, self.tokenizer, self.exact_match, self.exact_match_max_new_tokens,
                self.exact_match_batch_size,
            )
            self.log("val/exact_match", rate)

    def configure_optimizers(self):
        """The configured optimizer over the trained model's parameters; warmup + decay per step."""
        params = [p for p in self.trained_model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = build_scheduler(optimizer, self.scheduler_name, total_steps, self.warmup_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
