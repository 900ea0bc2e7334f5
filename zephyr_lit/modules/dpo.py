"""DPOModule: the trainable policy and its frozen reference, kept in sync.

One step, as data: ``(2B, T)`` batch (chosen rows, then rejected rows) -> policy hidden states (one
pass; padded rows in a few passes of similar length, ``module.length_groups``) -> LM head at the
completion positions only -> per-sequence log-probs ``(2B,)`` in fp32 -> reference log-probs (one
no-grad pass, or the cache) -> ``dpo_loss`` -> this micro-batch's share of its window's loss, and
detached per-pair metrics summed into the window (``train/...``, logged once per optimizer step) or
the validation epoch (``val/...``).

The reference is built from the same weights as the policy (same spec, same code path, so the
same dtype, device and sharding), never trained (``requires_grad=False``, not in the optimizer), and
kept in eval mode for every forward, also after each validation loop. With ``dpo.ref.sync_steps``
it follows the policy by TR-DPO mix-up; otherwise checkpoints leave it out and it is rebuilt.

With an adapter (``peft=lora|qlora``) no second model is built: the policy is the start model plus a
new adapter, and the reference is the policy with its adapter switched off (``adapters.adapter_disabled``,
eval mode for that one pass only, so the policy itself keeps training in train mode).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from zephyr_lit.adapters import adapter_disabled
from zephyr_lit.errors import ConfigError
from zephyr_lit.losses import LossType, dpo_loss
from zephyr_lit.models import build_model
from zephyr_lit.modules.base import ChatModule
from zephyr_lit.reference import ReferenceCache, ReferenceSettings, freeze, mixup_, release

REFERENCE_PREFIX = "reference."
log = logging.getLogger(__name__)


@dataclass
class DPOSettings:
    """``dpo.*``: ``beta`` (temperature), ``loss_type`` (sigmoid | robust | ipo | hinge),
    ``label_smoothing`` (cDPO / robust), ``average_log_prob`` (mean instead of sum per sequence;
    null = true for ipo only), ``rpo_alpha`` (RPO, Pang et al. 2024, as TRL's ``rpo_alpha``: adds
    ``alpha *`` the chosen completions' mean token NLL, which keeps their likelihood from sinking),
    ``ref`` (see ``ReferenceSettings``)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    average_log_prob: bool | None = None
    rpo_alpha: float | None = None
    ref: ReferenceSettings = field(default_factory=ReferenceSettings)

    @property
    def average(self) -> bool:
        if self.average_log_prob is None:
            return self.loss_type == LossType.IPO.value
        return self.average_log_prob


class DPOModule(ChatModule):
    def __init__(self, *args, dpo: DPOSettings, reference_cache: ReferenceCache | None = None, **kwargs) -> None:
        kwargs.setdefault("scheduler", "linear")
        super().__init__(*args, **kwargs)
        if dpo.ref.precompute and reference_cache is None:
            raise ConfigError("dpo.ref.precompute=true needs a ReferenceCache (zephyr_lit.run.build_module makes one)")
        self.dpo = dpo
        self.reference_cache = reference_cache
        self.policy = None
        self.reference = None
        self.cached_logps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # split -> (chosen, rejected)
        self._last_sync_step = 0

    # ---- models ------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Policy and reference from the same spec (under ZeRO-3 both are partitioned alike); with an
        adapter, the policy alone (the reference is inside it)."""
        self.hold_zero3_loading_config()
        if self.policy is None:
            self.policy = self.build_trained_model()
        if self.adapter is None and self.reference is None and not self.cached_logps:
            self.reference = freeze(build_model(self.model_spec))

    @property
    def trained_model(self):
        """The network that gets exported: the policy."""
        return self.policy

    def train(self, mode: bool = True) -> DPOModule:
        """Lightning switches the module back to train mode after validation: the reference stays eval."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def on_fit_start(self) -> None:
        """With ``dpo.ref.precompute``: the reference log-probs of every pair, then the reference is freed
        (with an adapter there is nothing to free: the reference is the policy's frozen base)."""
        if self.dpo.ref.precompute and not self.cached_logps:
            self.cached_logps = self.reference_cache.fill(self)
            if self.reference is not None:
                release(self)

    def reference_weights(self) -> torch.nn.Module:
        """The network holding the reference's weights: the reference, or the adapted policy."""
        return self.policy if self.adapter is not None else self.reference

    # ---- one step ----------------------------------------------------------------------------
    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        """``(2B,)``: chosen then rejected, from the cache when present, else one no-grad pass."""
        if split in self.cached_logps:
            chosen, rejected = self.cached_logps[split]
            index = batch["index"].cpu()
            return torch.cat([chosen[index], rejected[index]]).to(self.device)
        if self.adapter is not None:
            with adapter_disabled(self.policy) as start_model:
                return self.scores(start_model, batch).logps(self.dpo.average)
        return self.scores(self.reference, batch).logps(self.dpo.average)

    def _step(self, batch: dict[str, torch.Tensor], split: str, sums) -> torch.Tensor:
        """One forward of policy and reference; adds the pair metrics of the counted pairs to ``sums``
        and returns this micro-batch's share of its window's loss (training batches only)."""
        size = batch["index"].numel()  # B pairs; the batch holds 2B rows
        scores = self.scores(self.policy, batch)
        policy = scores.logps(self.dpo.average)  # (2B,)
        reference = self.reference_logps(batch, split)
        out = dpo_loss(
            self.dpo.loss_type, policy[:size], policy[size:], reference[:size], reference[size:],
            beta=self.dpo.beta, label_smoothing=self.dpo.label_smoothing,
        )
        mask = batch["counted"].bool() if "counted" in batch else torch.ones_like(out.losses, dtype=torch.bool)  # (B,)
        counted, pairs = mask.to(policy.dtype), mask.sum()
        per_pair = {
            "dpo_loss": out.losses,
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).to(policy.dtype),
            "logps/chosen": policy[:size],
            "logps/rejected": policy[size:],
        }
        for name, value in per_pair.items():
            sums.add(name, value.detach().masked_fill(~mask, 0.0).sum(), pairs)
        rows = torch.cat([counted, counted])  # (2B,)
        tokens = scores.token_count * rows  # (2B,)
        for side, part in (("chosen", slice(0, size)), ("rejected", slice(size, 2 * size))):
            sums.add(f"logits/{side}", (scores.logit_sum[part] * rows[part]).sum(), tokens[part].sum() * scores.vocab_size)
        chosen_nll = -(scores.logp_sum[:size] * counted).sum()
        if self.dpo.rpo_alpha:
            sums.add("nll_loss", chosen_nll, tokens[:size].sum())
        if "window_rows" not in batch:
            return out.losses.sum()  # validation: nothing to train
        # The window's loss: mean over its pairs of the DPO loss + alpha x its chosen tokens' mean NLL.
        share = out.losses.sum() / batch["window_rows"]
        if self.dpo.rpo_alpha:
            share = share + self.dpo.rpo_alpha * chosen_nll / batch["window_tokens"].clamp(min=1)
        return share

    def window_metrics(self, means: dict[str, float], stage: str) -> dict[str, float]:
        """``loss`` = the mean DPO loss (+ ``rpo_alpha`` x the chosen tokens' mean NLL), as TRL logs it."""
        means = dict(means)
        loss = means.pop("dpo_loss")
        if self.dpo.rpo_alpha:
            loss += self.dpo.rpo_alpha * means["nll_loss"]
        return {"loss": loss, **means}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        share = self._step(batch, "train", self.train_sums)
        self.log_window(batch)
        return self.for_backward(share)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val", self.val_sums)

    # ---- TR-DPO sync ---------------------------------------------------------------------------
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        steps, step = self.dpo.ref.sync_steps, self.trainer.global_step
        if steps and step > self._last_sync_step and step % steps == 0:
            mixup_(self.reference, self.policy, self.dpo.ref.mixup_alpha)
            self._last_sync_step = step

    # ---- checkpoints: the reference only when it moved ------------------------------------------
    def setup(self, stage: str) -> None:
        """Under DeepSpeed, sharded checkpoints leave the frozen reference out
        (``strategy.exclude_frozen_parameters``) unless TR-DPO moves it; loading is then not strict,
        since ``configure_model`` rebuilds the reference from the start weights."""
        super().setup(stage)
        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            if self.dpo.ref.sync_steps and strategy.exclude_frozen_parameters:
                log.info("dpo.ref.sync_steps moves the reference: DeepSpeed checkpoints keep it")
                strategy.exclude_frozen_parameters = False
            self.strict_loading = not strategy.exclude_frozen_parameters

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if not self.dpo.ref.sync_steps:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(REFERENCE_PREFIX)]:
                del state[key]
        checkpoint["dpo_last_sync_step"] = self._last_sync_step

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint without reference weights gets the rebuilt start weights (same as at start).
        (DeepSpeed restores the weights itself and hands over no ``state_dict`` here.)"""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict")
        if state is not None and self.reference is not None and not any(k.startswith(REFERENCE_PREFIX) for k in state):
            for key, value in self.reference.state_dict().items():
                state[REFERENCE_PREFIX + key] = value
        self._last_sync_step = checkpoint.get("dpo_last_sync_step", 0)

