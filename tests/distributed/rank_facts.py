"""A callback for the multi-process tests: each rank writes what it saw to ``<out_dir>/rank<R>.json``
and its final trained weights (and reference log-prob cache, if any) to ``<out_dir>/rank<R>.pt``.

Added to a run from the command line, so the real launch path is what gets tested::

    torchrun --standalone --nproc-per-node 2 train.py ... \\
        +callbacks.rank_facts._target_=tests.distributed.rank_facts.RankFacts \\
        +callbacks.rank_facts.out_dir=/some/folder

(``tests`` imports as a namespace package from the repository root, which is ``train.py``'s folder.)

Facts per rank: world size and rank, the weights hash of the trained model at the start and end of
fit and of the frozen reference (DPO), the real rows of this rank's validation shard and its number of
batches (padding included), every validation's synced metrics (``trainer.callback_metrics``) and
this rank's own, not yet reduced, share of each validation mean (the module's ``val_sums``: total and
count, just before the ranks are reduced), so a test can tell a global mean from a mean of per-rank means.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch


def weights_hash(model: torch.nn.Module | None) -> str | None:
    if model is None:
        return None
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _rank_shares(pl_module: L.LightningModule) -> dict[str, list[float]]:
    """``{val/metric: [this rank's total, its count]}`` before the ranks are reduced (the module's
    ``val_sums``). DPO's ``val/loss`` is the mean DPO loss when there is no RPO term."""
    sums = pl_module.val_sums
    shares = {f"val/{name}": [float(sums.totals[name]), float(sums.counts[name])] for name in sums.totals}
    if "val/dpo_loss" in shares and "val/nll_loss" not in shares:
        shares["val/loss"] = shares["val/dpo_loss"]
    return shares


class RankFacts(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.facts: dict = {"validations": [], "val_shares": []}

    @staticmethod
    def _trained(pl_module: L.LightningModule) -> torch.nn.Module:
        return pl_module.trained_model

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the module's on_fit_start (the reference cache is filled by then) and before any step.
        self.facts.update(
            world_size=trainer.world_size,
            global_rank=trainer.global_rank,
            estimated_stepping_batches=int(trainer.estimated_stepping_batches),
            train_batches=len(trainer.train_dataloader),
            start_hash=weights_hash(self._trained(pl_module)),
            reference_start_hash=weights_hash(getattr(pl_module, "reference", None)),
        )
        from zephyr_lit.data.base import TOKENIZED_ROWS

        train_set = trainer.datamodule.train_set.with_format(None)
        self.facts["tokenized_rows"] = sum(TOKENIZED_ROWS.values())  # by this process (a fresh one under torchrun)
        rows = [train_set[i] for i in range(len(train_set))]  # every column: SFT or preference rows
        self.facts["train_rows_hash"] = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
        shard = trainer.val_dataloaders.dataset  # data/base.py EqualShard
        self.facts["val_rows"] = len(shard.real_indices)
        self.facts["val_batches"] = len(trainer.val_dataloaders)
        if "index" in shard.dataset.column_names:
            self.facts["val_index"] = [int(shard.dataset[i]["index"]) for i in shard.real_indices]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Callbacks run this hook before the module's: the sums are still this rank's own here.
        if not trainer.sanity_checking:
            self.facts["val_shares"].append(_rank_shares(pl_module))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}
            self.facts["validations"].append({"step": trainer.global_step, "metrics": metrics})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = self._trained(pl_module)
        self.facts.update(
            global_step=trainer.global_step,
            end_hash=weights_hash(model),
            reference_end_hash=weights_hash(getattr(pl_module, "reference", None)),
        )
        payload = {"weights": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        cached = getattr(pl_module, "cached_logps", None)
        if cached:
            payload["cached_logps"] = {split: [t.clone() for t in pair] for split, pair in cached.items()}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        torch.save(payload, self.out_dir / f"rank{rank}.pt")
        (self.out_dir / f"rank{rank}.json").write_text(json.dumps(self.facts, indent=2) + "\n")
