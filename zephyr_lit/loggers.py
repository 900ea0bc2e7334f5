"""A CSV logger with one fixed file, ``<output_dir>/metrics.csv``, that a resumed run appends to."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only


class CSVMetricsLogger(Logger):
    """Rows of ``step`` plus metric columns. A metric never seen before widens the header (the file
    is rewritten atomically then); otherwise rows are appended. No ``version_N`` folders."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = Path(path)

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str:
        return str(self.path.parent)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Hyperparameters go to ``summary.json`` and Hydra's ``.hydra/config.yaml``, not to this file."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        header = self._header()
        if header is not None and set(row) <= set(header):
            with open(self.path, "a", newline="", encoding="utf-8") as handle:
                csv.DictWriter(handle, header).writerow(row)
            return
        self._rewrite(row, header)

    def _header(self) -> list[str] | None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        with open(self.path, newline="", encoding="utf-8") as handle:
            return next(csv.reader(handle), None)

    def _rewrite(self, row: dict, header: list[str] | None) -> None:
        rows: list[dict] = []
        if header is not None:
            with open(self.path, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        columns = list(header or ["step"]) + [k for k in row if k not in (header or ["step"])]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows([*rows, row])
        os.replace(tmp, self.path)
