"""``task=alpaca_eval``: outputs for AlpacaEval's instructions and, against reference outputs, a judged win rate.

```
<output_dir>/<model_id>/model_outputs.json          [{instruction, output, generator, dataset}] (alpaca_eval reads it)
<output_dir>/<model_id>/annotations_<judge>.json    per instruction: output_1 (reference), output_2 (model),
                                                    preference 1..2 (2: the model's is better), both judgments
<output_dir>/<judge>_leaderboard.csv                every model_id judged by <judge>: win_rate, standard_error, ...
```
Each instruction is judged twice, the model's output shown first (as A) then second (as B), which
cancels the judge's position bias: a win in one order is worth 1, a tie 0.5, a loss 0; the
instruction's value v is the mean of both orders, its AlpacaEval preference 1 + v. ``win_rate`` and
``standard_error`` follow ``alpaca_eval``: 100 x the mean of v and 100 x its standard error (ddof=1).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from zephyr_lit.assets import asset_path
from zephyr_lit.assets.eval_sets import JUDGE_PROMPTS
from zephyr_lit.checkpointing import atomic_write
from zephyr_lit.distill.judge_templates import PAIR, TIE, JudgePrompt, load_judge_prompts, parse_choice, pick
from zephyr_lit.errors import DataError
from zephyr_lit.evaluate.answers import Conversation, answer_conversations
from zephyr_lit.evaluate.inputs import read_alpaca
from zephyr_lit.jsonl import write_json
from zephyr_lit.evaluate.judging import JudgeSettings, ask_judge, file_name, judge_problems, judge_settings, judge_unit
from zephyr_lit.generation import Backend, Sampling

ORDERS = {"model_first": ("output_2", "output_1"), "reference_first": ("output_1", "output_2")}  # (A, B)
MODEL_WINS = {("model_first", "A"): 1.0, ("model_first", "B"): 0.0, ("reference_first", "A"): 0.0,
              ("reference_first", "B"): 1.0}


@dataclass(frozen=True)
class WinRate:
    """AlpacaEval's leaderboard numbers (win_rate and standard_error in percent)."""

    win_rate: float
    standard_error: float
    n_wins: int
    n_wins_base: int
    n_draws: int
    n_total: int


def win_rate(values: list[float]) -> WinRate:
    """From per-instruction values v in [0, 1] (1: the model's output is better): 100 mean(v) and
    100 sqrt(sum (v - mean)^2 / (n - 1)) / sqrt(n) (NaN for n < 2); wins v > 0.5, draws v = 0.5."""
    n = len(values)
    mean = sum(values) / n if n else math.nan
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n) if n > 1 else math.nan
    return WinRate(100 * mean, 100 * spread, sum(v > 0.5 for v in values), sum(v < 0.5 for v in values),
                   sum(v == 0.5 for v in values), n)


def alpaca_eval_problems(cfg: DictConfig) -> list[str]:
    problems = [f"{key}={value}: no such file" for key in ("instructions", "reference_outputs", "judge_prompts")
                if (value := cfg.get(key)) is not None and not Path(str(value)).is_file()]
    if not cfg.get("instructions"):
        problems.append("instructions is not set: give an AlpacaEval eval set (JSON list of {instruction, ...})")
    if cfg.max_new_tokens < 1 or cfg.alpaca_eval.chunk_size < 1:
        problems.append(f"max_new_tokens={cfg.max_new_tokens} and alpaca_eval.chunk_size={cfg.alpaca_eval.chunk_size} "
                        "must be at least 1")
    if cfg.alpaca_eval.temperature < 0:
        problems.append(f"alpaca_eval.temperature={cfg.alpaca_eval.temperature} must be >= 0 (0: greedy)")
    if cfg.get("max_questions") is not None and cfg.max_questions < 1:
        problems.append(f"max_questions={cfg.max_questions} must be at least 1 (or null: all)")
    return problems + (judge_problems(cfg, asset_path(JUDGE_PROMPTS)) if cfg.get("reference_outputs") else [])


def write_outputs(rows: list[dict], build: Callable[[], Backend], path: Path, model_id: str,
                  cfg: DictConfig) -> list[dict]:
    """``model_outputs.json`` for ``rows``: the outputs already there (same generator and instruction) are
    kept, the rest generated (the backend built only then), the file rewritten after each chunk."""
    done = {}
    if path.exists():
        done = {r["instruction"]: r for r in read_alpaca(path, needs_output=True) if r.get("generator") == model_id}
    todo = [r for r in rows if r["instruction"] not in done]
    sampling = Sampling(cfg.alpaca_eval.temperature, 1.0, cfg.max_new_tokens)
    backend = build() if todo else None
    chunk = cfg.alpaca_eval.chunk_size
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        items = [Conversation(r["instruction"], (r["instruction"],), sampling) for r in part]
        for row, answers in zip(part, answer_conversations(backend, items, cfg.seed)):
            if answers is not None:
                done[row["instruction"]] = {"instruction": row["instruction"], "output": answers[0],
                                            "generator": model_id, "dataset": row.get("dataset", "")}
        write_json(path, [done[r["instruction"]] for r in rows if r["instruction"] in done])
    return [done[r["instruction"]] for r in rows if r["instruction"] in done]


def references_for(outputs: list[dict], path: str) -> dict[str, dict]:
    """instruction -> reference row, for every output; a missing one is a DataError."""
    references = {r["instruction"]: r for r in read_alpaca(path, needs_output=True)}
    missing = [o["instruction"] for o in outputs if o["instruction"] not in references]
    if missing:
        raise DataError(f"{path}: no reference output for {len(missing)} instruction(s), e.g. {missing[0][:60]!r}; "
                        "give a reference for every instruction")
    return references


def pair_key(pair: dict) -> tuple[str, str, str, str]:
    """An annotation stands while its instruction, both outputs and the judge prompt are unchanged."""
    return pair["instruction"], pair["output_1"], pair["output_2"], pair["judge_prompt"]


def prompt_digest(prompt: JudgePrompt) -> str:
    return hashlib.sha256(f"{prompt.system_prompt}\x1f{prompt.prompt_template}".encode()).hexdigest()[:16]


def annotate(pairs: list[dict], records: dict[tuple, dict], judge_name: str) -> dict[tuple, dict]:
    """The annotation of each pair whose two verdicts came back (a failed request: asked again on a rerun)."""
    out = {}
    for pair in pairs:
        verdicts = {order: records.get((pair["instruction"], order)) for order in ORDERS}
        if any(v is None for v in verdicts.values()):
            continue
        values = [0.5 if v.get("verdict") == TIE else MODEL_WINS.get((o, v.get("verdict")))
                  for o, v in verdicts.items()]
        out[pair_key(pair)] = {**pair, "annotator": judge_name,
                               "preference": None if None in values else 1 + sum(values) / 2,
                               "judgments": {o: v.get("judgment", "") for o, v in verdicts.items()},
                               "tstamp": time.time()}
    return out


def compare(outputs: list[dict], references: dict[str, dict], judge: Backend, prompts_path: str, path: Path,
            settings: JudgeSettings, seed: int, chunk_size: int = 16) -> tuple[list[dict], dict[str, int]]:
    """Each output against its reference, judged in both orders (kept when unchanged); ``path`` is
    rewritten after each chunk. The annotations and counts."""
    prompt = pick(load_judge_prompts(prompts_path), PAIR, ("question", "answer_a", "answer_b"), prompts_path)
    done = {pair_key(a): a for a in read_alpaca(path, needs_output=False)} if path.exists() else {}
    pairs = [{"instruction": o["instruction"], "output_1": references[o["instruction"]]["output"],
              "generator_1": references[o["instruction"]].get("generator", "reference"), "output_2": o["output"],
              "generator_2": o["generator"], "judge_prompt": prompt_digest(prompt)} for o in outputs]
    todo = [p for p in pairs if pair_key(p) not in done]
    counts: dict[str, int] = {"kept": len(pairs) - len(todo)}
    for start in range(0, len(todo), chunk_size):
        part = todo[start : start + chunk_size]
        units = [judge_unit(p["instruction"], order, prompt, {"question": p["instruction"], "answer_a": p[first],
                                                              "answer_b": p[second]}, parse_choice, settings, seed)
                 for p in part for order, (first, second) in ORDERS.items()]
        done.update(annotate(part, ask_judge(judge, units, settings, counts), judge.name))
        write_json(path, [done[pair_key(p)] for p in pairs if pair_key(p) in done])
    return [done[pair_key(p)] for p in pairs if pair_key(p) in done], counts


def leaderboard(output_dir: Path, judge_name: str) -> list[dict]:
    """One row per ``model_id`` folder with this judge's annotations, best win rate first."""
    rows = []
    for path in sorted(output_dir.glob(f"*/annotations_{file_name(judge_name)}.json")):
        annotations = read_alpaca(path, needs_output=False)
        values = [a["preference"] - 1 for a in annotations if a.get("preference") is not None]
        outputs = [a["output_2"] for a in annotations]
        rows.append({"model": path.parent.name, **vars(win_rate(values)),
                     "n_unrated": len(annotations) - len(values),
                     "avg_length": round(sum(map(len, outputs)) / max(1, len(outputs)))})
    return sorted(rows, key=lambda r: -r["win_rate"] if not math.isnan(r["win_rate"]) else math.inf)


def write_leaderboard(rows: list[dict], path: Path) -> None:
    """The leaderboard rows as CSV (floats with 4 decimals), replacing ``path`` atomically."""
    columns = list(rows[0]) if rows else ["model"]
    with atomic_write(path, encoding="utf-8") as handle:
        handle.write(",".join(columns) + "\n")
        for row in rows:
            handle.write(",".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()) + "\n")


def run_alpaca_eval(cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    """Write the outputs, then (with ``reference_outputs``) judge them; this model's leaderboard row."""
    rows = read_alpaca(cfg.instructions, needs_output=False)[: cfg.get("max_questions")]
    seen = {}
    for index, row in enumerate(rows):
        if seen.setdefault(row["instruction"], index) != index:
            raise DataError(f"{cfg.instructions} row {index}, field 'instruction': the same as row "
                            f"{seen[row['instruction']]}; instructions must be unique")
    folder = output_dir / str(cfg.model_id)
    if cfg.get("reference_outputs"):
        references_for(rows, cfg.reference_outputs)  # checked before any model loads
    outputs = write_outputs(rows, lambda: instantiate(cfg.answers.backend), folder / "model_outputs.json",
                            str(cfg.model_id), cfg)
    print(f"alpaca_eval: {len(outputs)} outputs -> {folder / 'model_outputs.json'}\n"
          f"  official evaluation: alpaca_eval --model_outputs {folder / 'model_outputs.json'}")
    if not cfg.get("reference_outputs"):
        return {"n_outputs": float(len(outputs))}
    judge = instantiate(cfg.judge.backend)
    annotations_path = folder / f"annotations_{file_name(judge.name)}.json"
    _, counts = compare(outputs, references_for(outputs, cfg.reference_outputs), judge, str(cfg.judge_prompts),
                        annotations_path, judge_settings(cfg), cfg.seed, cfg.alpaca_eval.chunk_size)
    board = leaderboard(output_dir, judge.name)
    board_path = output_dir / f"{file_name(judge.name)}_leaderboard.csv"
    write_leaderboard(board, board_path)
    print(f"alpaca_eval: judge {judge.name}, {counts['kept']} comparisons kept, {counts['unrated']} unrated replies, "
          f"{counts['failed']} failed requests -> {annotations_path}")
    for row in board:
        print(f"  {row['model']}: win rate {row['win_rate']:.2f}% +- {row['standard_error']:.2f} "
              f"({row['n_wins']} wins, {row['n_draws']} draws, {row['n_wins_base']} losses of {row['n_total']})")
    print(f"-> {board_path}")
    return next(({k: float(v) for k, v in r.items() if k != "model"} for r in board if r["model"] == cfg.model_id), {})
