"""Callbacks: validation before the first optimizer step and on the final weights."""

from __future__ import annotations

import lightning as L


def run_validation(trainer: L.Trainer) -> None:
    """Run the fit loop's validation loop now, the way the epoch loop does between steps."""
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    val_loop.setup_data()
    if not trainer.val_dataloaders:
        return
    was_training = trainer.training
    trainer.validating = True
    val_loop.run()
    trainer.training = was_training


class ValidateAtEdges(L.Callback):
    """Validate at the start of fit (the untrained baseline) and at the end, unless the last
    optimizer step was just validated. This holds whatever ``max_steps`` or ``max_epochs`` is."""

    def __init__(self) -> None:
        self.validated_at_step: int | None = None
        self.initial_metrics: dict[str, float] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_at_step = trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_validation(trainer)
        self.initial_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.validated_at_step != trainer.global_step:
            run_validation(trainer)
