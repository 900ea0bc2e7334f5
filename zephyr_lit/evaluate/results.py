"""MT-Bench results: the score table (per category, per turn, overall; one column per model), CSV and chart.

``score_table`` is FastChat's ``show_result.py --mode single`` arithmetic: plain means of the 1-10
scores, with unrated judgments (score -1) left out; a category's score is the mean over both turns of
its questions, ``overall`` the mean of every judgment. Several ``model_id``s judged by the same judge
(one ``model_judgment/<judge>_single.jsonl``) become columns side by side, best overall first.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from zephyr_lit.checkpointing import atomic_write

UNRATED = -1
TURNS = ("turn 1", "turn 2")
OVERALL = "overall"


@dataclass(frozen=True)
class ScoreTable:
    """``scores[(row, model)]``: the mean score (None: nothing judged); ``rows`` = categories, turns, overall."""

    rows: list[str]
    models: list[str]
    scores: dict[tuple[str, str], float | None]
    judged: dict[str, int]  # model -> judgments with a score
    unrated: dict[str, int]  # model -> judgments without one (-1)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_table(judgments: Iterable[Mapping], categories: Mapping[object, str]) -> ScoreTable:
    """The table of ``judgments`` (FastChat's fields: ``model``, ``question_id``, ``turn``, ``score``)
    for the questions in ``categories`` (question_id -> category, in the order to show)."""
    groups: dict[tuple[str, str], list[float]] = {}
    judged: dict[str, int] = {}
    unrated: dict[str, int] = {}
    for row in judgments:
        category = categories.get(row["question_id"])
        if category is None:
            continue
        model = row["model"]
        judged.setdefault(model, 0)
        unrated.setdefault(model, 0)
        if row["score"] == UNRATED:
            unrated[model] += 1
            continue
        judged[model] += 1
        for name in (category, f"turn {row['turn']}", OVERALL):
            groups.setdefault((name, model), []).append(float(row["score"]))
    rows = list(dict.fromkeys(categories.values()))
    rows += [t for t in TURNS if any(key[0] == t for key in groups)] + [OVERALL]
    scores = {(r, m): mean(groups.get((r, m), [])) for r in rows for m in judged}
    models = sorted(judged, key=lambda m: -(scores[(OVERALL, m)] or 0.0))
    return ScoreTable(rows, models, scores, judged, unrated)


def format_table(table: ScoreTable) -> str:
    """The table as aligned text, two decimals, ``-`` where nothing was judged."""
    width = max([len(r) for r in table.rows] + [8])
    columns = [max(len(m), 6) for m in table.models]
    lines = [" " * width + "".join(f"  {m:>{w}}" for m, w in zip(table.models, columns))]
    for row in table.rows:
        cells = [table.scores[(row, m)] for m in table.models]
        lines.append(f"{row:<{width}}" + "".join(
            f"  {'-' if v is None else f'{v:.2f}':>{w}}" for v, w in zip(cells, columns)))
    return "\n".join(lines)


def write_csv(table: ScoreTable, path: Path) -> None:
    """``score,<model>,...`` then one line per row (4 decimals, empty where nothing was judged)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["score", *table.models])
    for row in table.rows:
        values = [table.scores[(row, m)] for m in table.models]
        writer.writerow([row, *("" if v is None else f"{v:.4f}" for v in values)])
    with atomic_write(path, encoding="utf-8") as handle:
        handle.write(buffer.getvalue())


def plot_categories(table: ScoreTable, path: Path, title: str) -> bool:
    """A bar chart of the category scores (one bar per model in each category) as PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    categories = [r for r in table.rows if r not in (*TURNS, OVERALL)]
    width = 0.8 / max(1, len(table.models))
    figure, axes = plt.subplots(figsize=(max(5.0, 1.1 * len(categories) + 2), 3.5))
    for index, model in enumerate(table.models):
        heights = [table.scores[(c, model)] or 0.0 for c in categories]
        offsets = [i + (index - (len(table.models) - 1) / 2) * width for i in range(len(categories))]
        axes.bar(offsets, heights, width, label=f"{model} ({table.scores[(OVERALL, model)] or 0:.2f})")
    axes.set_xticks(range(len(categories)), categories)
    axes.set_ylim(0, 10)
    axes.set_ylabel("score (1-10)")
    axes.set_title(title)
    axes.legend(fontsize="small", loc="upper right")
    figure.tight_layout()
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)
    return True
