"""A CSV logger with one fixed file, ``<output_dir>/metrics.csv``, that a resumed run appends to, and
``append_lines``, the append that never leaves half a line (also used by ``generations.jsonl``)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from zephyr_lit.checkpointing import atomic_write


class CSVMetricsLogger(Logger):
    """Rows of ``step`` plus metric columns. A metric never seen before widens the header (the file
    is rewritten atomically then: a kill leaves the old file); otherwise a row is appended as one
    write of a whole line. No ``version_N`` folders."""

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
            self._append(row, header)
            return
        self._rewrite(row, header)

    def _append(self, row: dict, header: list[str]) -> None:
        line = io.StringIO()
        csv.DictWriter(line, header).writerow(row)
        append_lines(self.path, line.getvalue())

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
        with atomic_write(self.path, newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows([*rows, row])


def append_lines(path: Path, text: str) -> None:
    """Append ``text`` (whole lines, ending in ``\\n``) to ``path`` in one ``write`` call, after cutting a
    torn last line (a kill inside an earlier write), so a resumed run never glues its first line onto
    half a line. Creates ``path`` when it is missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        end = handle.seek(0, os.SEEK_END)
        if end:
            handle.seek(end - 1)
            if handle.read(1) != b"\n":
                handle.seek(0)
                handle.truncate(handle.read().rfind(b"\n") + 1)
        handle.write(text.encode("utf-8"))
