"""SFTModule: next-token cross-entropy on the labelled (assistant) tokens of chat data.

The loss of one optimizer step is the mean over every label token of its accumulation window (all
micro-batches, all ranks), not a mean of per-micro-batch means. Each micro-batch carries its
window's label count (``window_tokens``, from ``WindowBatchSampler``) and contributes
``sum_nll / window_tokens`` (scaled for Lightning and the strategy by ``ChatModule.for_backward``).
``train/loss`` is logged once per window with the same global token mean; ``val/loss`` is the token
mean over the whole validation set. With ``peft=lora|qlora`` only the adapter trains (``zephyr_lit/adapters.py``).
"""

from __future__ import annotations

import math

import torch

from zephyr_lit.modules.base import ChatModule


class SFTModule(ChatModule):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.model = None

    @property
    def trained_model(self):
        """The network that gets exported."""
        return self.model

    def configure_model(self) -> None:
        """Build the network here: under DeepSpeed ZeRO-3, Lightning runs this inside ``zero.Init``."""
        self.hold_zero3_loading_config()
        if self.model is None:
            self.model = self.build_trained_model()

    # ---- training ---------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        return self.model(**inputs, use_cache=False).logits  # (B, T, V)

    def add_scores(self, sums, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Add the batch's summed NLL and label count to ``sums`` (``loss``); returns the summed NLL.
        A validation padding row has no labels, so it counts nowhere."""
        scores = self.scores(self.model, batch)
        nll_sum = -scores.logp_sum.sum()
        sums.add("loss", nll_sum, scores.token_count.sum())
        return nll_sum

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll_sum = self.add_scores(self.train_sums, batch)
        self.log_window(batch)
        return self.for_backward(nll_sum / batch["window_tokens"].clamp(min=1))

    def window_metrics(self, means: dict[str, float], stage: str) -> dict[str, float]:
        if stage == "val":
            return means | {"perplexity": math.exp(min(means["loss"], 700.0))}
        return means

    # ---- validation -------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.add_scores(self.val_sums, batch)
