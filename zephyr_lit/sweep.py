"""At the end of a Hydra multirun: one table of every job's overrides and final metrics, best first.

Writes ``<sweep dir>/sweep_summary.csv`` from each job's ``summary.json`` and prints it.
dDPO jobs rank by ``val/rewards/accuracies`` then ``val/rewards/margins`` (higher first), dSFT jobs
by ``val/loss`` (lower first).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

PREFERENCE_KEYS = ("val/rewards/accuracies", "val/rewards/margins")


def ranking_key(summary: dict) -> tuple[float, ...]:
    """Smaller sorts first; a job without the metric sorts last."""
    metrics = summary.get("metrics", {})
    if any(k in metrics for k in PREFERENCE_KEYS):
        return tuple(-metrics.get(k, -math.inf) for k in PREFERENCE_KEYS)
    return (metrics.get("val/loss", math.inf),)


def varying(overrides: list[list[str]]) -> list[list[str]]:
    """Keep, in each job's overrides, only those whose value differs between jobs (the swept keys)."""
    parsed = [dict(o.split("=", 1) if "=" in o else (o, "") for o in job) for job in overrides]
    keys = {k for job in parsed for k in job}
    swept = {k for k in keys if len({job.get(k) for job in parsed}) > 1}
    return [[f"{k}={v}" for k, v in job.items() if k in swept] for job in parsed]


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder with a ``summary.json``, best first; ``overrides`` lists the swept keys."""
    summaries = []
    for path in sorted(sweep_dir.glob("*/summary.json"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0):
        summary = json.loads(path.read_text())
        summary["job"] = path.parent.name
        summaries.append(summary)
    for summary, swept in zip(summaries, varying([s.get("overrides", []) for s in summaries])):
        summary["swept"] = " ".join(swept)
    summaries.sort(key=ranking_key)
    return [
        {"rank": rank, "job": s["job"], "overrides": s["swept"], **s.get("metrics", {})}
        for rank, s in enumerate(summaries, start=1)
    ]


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no job wrote a summary.json)"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[f"{row.get(c, ''):.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks.sweep_summary``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = sweep_rows(sweep_dir)
        write_table(rows, sweep_dir / "sweep_summary.csv")
        print(f"\nSweep summary ({sweep_dir / 'sweep_summary.csv'}), best first:\n{format_table(rows)}")
