"""Test callback: each rank writes what its data module kept and dropped (``out_dir/rank<r>.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class DataFacts(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        data = trainer.datamodule
        facts = {"stats": data.summary_stats(), "train_rows": len(data.train_set), "val_rows": len(data.val_set),
                 "dropped_rows": data.dropped_rows}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(facts))
