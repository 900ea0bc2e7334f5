"""``task=mt_bench``: answers to FastChat ``llm_judge`` questions, single-answer grading, the score table.

```
<output_dir>/model_answer/<model_id>.jsonl            question_id, answer_id, model_id, choices[0].turns, tstamp
<output_dir>/model_judgment/<judge>_single.jsonl      question_id, model, judge [name, prompt], user_prompt,
                                                      judgment, score (1-10; -1 unrated), turn, tstamp
<output_dir>/<judge>_results.csv, <judge>_results.png  every model judged by <judge>, side by side
```
Answers: two turns through the model's chat template at FastChat's per-category temperature (0:
greedy), ``max_new_tokens`` per turn. Judging: turn 1 with ``single-v1`` (``single-math-v1`` where the
category has a reference), turn 2 with the ``-multi-turn`` entries, which show the whole dialogue.
Both files are rewritten atomically after every chunk of questions; a rerun keeps the answers already
written and the judgments whose prompt is unchanged, and does the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from zephyr_lit.assets import asset_path
from zephyr_lit.assets.eval_sets import JUDGE_PROMPTS
from zephyr_lit.distill.judge_templates import SINGLE, JudgePrompt, load_judge_prompts, parse_rating, pick
from zephyr_lit.distill.rate import Unit
from zephyr_lit.errors import DataError
from zephyr_lit.evaluate.answers import Conversation, answer_conversations, answer_id
from zephyr_lit.evaluate.inputs import Question, read_answer_turns, read_questions
from zephyr_lit.jsonl import read_jsonl, write_jsonl
from zephyr_lit.evaluate.judging import (JudgeSettings, ask_judge, file_name, judge_problems, judge_settings,
                                         judge_unit, user_prompt)
from zephyr_lit.evaluate.results import UNRATED, format_table, plot_categories, score_table, write_csv
from zephyr_lit.generation import Backend, Sampling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MTBenchSettings:
    temperatures: dict[str, float]
    default_temperature: float = 0.7
    reference_categories: tuple[str, ...] = ("math", "reasoning", "coding", "arena-hard-200")
    chunk_size: int = 16
    max_new_tokens: int = 1024
    max_questions: int | None = None

    def sampling(self, category: str) -> Sampling:
        return Sampling(self.temperatures.get(category, self.default_temperature), 1.0, self.max_new_tokens)


def mt_bench_settings(cfg: DictConfig) -> MTBenchSettings:
    section = OmegaConf.to_container(cfg.mt_bench, resolve=True)
    return MTBenchSettings(**{**section, "reference_categories": tuple(section.get("reference_categories") or ())},
                           max_new_tokens=cfg.max_new_tokens, max_questions=cfg.get("max_questions"))


def mt_bench_problems(cfg: DictConfig) -> list[str]:
    try:
        settings = mt_bench_settings(cfg)
    except TypeError as error:  # an unknown key in the section
        return [f"mt_bench: {error}"]
    problems = [f"{key}={value}: no such file" for key in ("questions", "judge_prompts", "reference_answers")
                if (value := cfg.get(key)) is not None and not Path(str(value)).is_file()]
    if not cfg.get("questions"):
        problems.append("questions is not set: give a FastChat question.jsonl")
    if settings.max_new_tokens < 1 or settings.chunk_size < 1:
        problems.append(f"max_new_tokens={settings.max_new_tokens} and mt_bench.chunk_size={settings.chunk_size} "
                        "must be at least 1")
    if settings.max_questions is not None and settings.max_questions < 1:
        problems.append(f"max_questions={settings.max_questions} must be at least 1 (or null: all)")
    if any(t < 0 for t in [*settings.temperatures.values(), settings.default_temperature]):
        problems.append("mt_bench.temperatures and mt_bench.default_temperature must be >= 0 (0: greedy)")
    return problems + judge_problems(cfg, asset_path(JUDGE_PROMPTS))


def load_questions(cfg: DictConfig, settings: MTBenchSettings) -> list[Question]:
    """The questions (the first ``max_questions``), each reference category's with its reference answer
    (``reference_answers`` when given, else the question's own ``reference``)."""
    questions = read_questions(cfg.questions)[: settings.max_questions]
    given = read_answer_turns(cfg.reference_answers) if cfg.get("reference_answers") else None
    out = []
    for q in questions:
        if q.category not in settings.reference_categories:
            out.append(Question(q.question_id, q.category, q.turns))
            continue
        reference = given.get(q.question_id) if given is not None else q.reference
        if reference is None or len(reference) < len(q.turns):
            source = cfg.reference_answers if given is not None else cfg.questions
            raise DataError(f"{source}: question_id {q.question_id} (category {q.category}) has no reference answer "
                            f"for each turn; add one, or leave {q.category} out of mt_bench.reference_categories")
        out.append(Question(q.question_id, q.category, q.turns, tuple(reference[: len(q.turns)])))
    return out


def single_prompts(path: str) -> dict[tuple[bool, bool], JudgePrompt]:
    """The four single-grading entries, (multi-turn, with reference) -> prompt, checked for their fields."""
    prompts = load_judge_prompts(path)
    needs = {False: ("question", "answer"), True: ("question_1", "answer_1", "question_2", "answer_2")}
    refs = {(False, False): (), (False, True): ("ref_answer_1",), (True, False): (),
            (True, True): ("ref_answer_1", "ref_answer_2")}
    return {key: pick(prompts, name, needs[key[0]] + refs[key], path) for key, name in SINGLE.items()}


def answer_row(q: Question, model_id: str, answers: tuple[str, ...]) -> dict:
    """One line of ``model_answer/<model_id>.jsonl`` in FastChat's fields."""
    return {"question_id": q.question_id, "answer_id": answer_id(model_id, q.question_id, answers),
            "model_id": model_id, "choices": [{"index": 0, "turns": list(answers)}], "tstamp": time.time()}


def write_answers(questions: list[Question], backend: Callable[[], Backend], path: Path, model_id: str,
                  settings: MTBenchSettings, seed: int) -> dict[object, tuple[str, ...]]:
    """Answer what ``path`` lacks (the backend is built only then); question_id -> the answer's turns."""
    rows = {row["question_id"]: row for _, row in read_jsonl(path)} if path.exists() else {}
    turns = {i: len(r["choices"][0]["turns"]) for i, r in rows.items()}
    todo = [q for q in questions if turns.get(q.question_id) != len(q.turns)]
    if len(todo) < len(questions):
        print(f"mt_bench: {len(questions) - len(todo)} answers of {model_id} already in {path}")
    model = backend() if todo else None
    for start in range(0, len(todo), settings.chunk_size):
        chunk = todo[start : start + settings.chunk_size]
        items = [Conversation(str(q.question_id), q.turns, settings.sampling(q.category)) for q in chunk]
        for q, answers in zip(chunk, answer_conversations(model, items, seed)):
            if answers is not None:
                rows[q.question_id] = answer_row(q, model_id, answers)
        asked = [q.question_id for q in questions if q.question_id in rows]
        write_jsonl(path, [rows[i] for i in asked] + [r for i, r in rows.items() if i not in set(asked)])
        log.info("mt_bench: answered %d of %d", min(start + settings.chunk_size, len(todo)), len(todo))
    return {i: tuple(r["choices"][0]["turns"]) for i, r in rows.items()}


def judge_fields(q: Question, answers: tuple[str, ...], turn: int) -> dict[str, str]:
    """The template fields of turn ``turn`` (1 or 2) of ``q``: turn 2 shows the whole dialogue."""
    if turn == 1:
        fields = {"question": q.turns[0], "answer": answers[0]}
    else:
        fields = {"question_1": q.turns[0], "answer_1": answers[0], "question_2": q.turns[1], "answer_2": answers[1]}
    for k, reference in enumerate(q.reference or (), 1):
        fields[f"ref_answer_{k}"] = reference
    return fields


@dataclass(frozen=True)
class TurnJudgment:
    """One turn to judge: its judge question (``unit``, keyed (question_id, ``turn<N>``)) and where it came from."""

    unit: Unit
    question: Question
    turn: int
    prompt: JudgePrompt

    @property
    def key(self) -> tuple[str, str]:
        return self.unit.key, self.unit.name


def turn_judgments(q: Question, answers: tuple[str, ...], prompts: dict[tuple[bool, bool], JudgePrompt],
                   settings: JudgeSettings, seed: int) -> list[TurnJudgment]:
    out = []
    for turn in range(1, len(q.turns) + 1):
        prompt = prompts[(turn == 2, q.reference is not None)]
        unit = judge_unit(str(q.question_id), f"turn{turn}", prompt, judge_fields(q, answers, turn), parse_rating,
                          settings, seed)
        out.append(TurnJudgment(unit, q, turn, prompt))
    return out


def write_judgments(questions: list[Question], answers: dict, model_id: str, judge: Backend,
                    prompts: dict[tuple[bool, bool], JudgePrompt], path: Path, settings: JudgeSettings,
                    chunk_size: int, seed: int) -> dict[str, int]:
    """Judge each answered turn whose judgment in ``path`` is missing or was made with another prompt
    (other answers, other templates); ``path`` is rewritten after each chunk. Counts."""
    rows = [row for _, row in read_jsonl(path)] if path.exists() else []
    counts: dict[str, int] = {"judged": 0, "kept": 0}
    answered = [q for q in questions if q.question_id in answers]
    for start in range(0, len(answered), chunk_size):
        turns = [t for q in answered[start : start + chunk_size]
                 for t in turn_judgments(q, answers[q.question_id], prompts, settings, seed)]
        done = {(str(r["question_id"]), f"turn{r['turn']}"): r["user_prompt"] for r in rows if r["model"] == model_id}
        todo = {t.key: t for t in turns if done.get(t.key) != user_prompt(t.unit)}
        counts["kept"] += len(turns) - len(todo)
        records = ask_judge(judge, [t.unit for t in todo.values()], settings, counts)
        fresh = {key: judgment_row(model_id, judge.name, todo[key], record) for key, record in records.items()}
        counts["judged"] += len(fresh)
        rows = [r for r in rows if r["model"] != model_id or (str(r["question_id"]), f"turn{r['turn']}") not in fresh]
        rows += fresh.values()
        write_jsonl(path, rows)
    return counts


def judgment_row(model_id: str, judge_name: str, judged: TurnJudgment, record: dict) -> dict:
    """One line of ``model_judgment/<judge>_single.jsonl`` in FastChat's fields (unrated: score -1)."""
    return {"question_id": judged.question.question_id, "model": model_id, "judge": [judge_name, judged.prompt.name],
            "user_prompt": user_prompt(judged.unit), "judgment": record.get("judgment", ""),
            "score": record.get("verdict", UNRATED), "turn": judged.turn, "tstamp": time.time()}


def run_mt_bench(cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    """Answer, judge, and write the table; this model's scores (``overall``, ``turn 1``, each category...)."""
    settings = mt_bench_settings(cfg)
    questions = load_questions(cfg, settings)
    prompts = single_prompts(str(cfg.judge_prompts))
    answer_path = output_dir / "model_answer" / f"{cfg.model_id}.jsonl"
    answers = write_answers(questions, lambda: instantiate(cfg.answers.backend), answer_path, cfg.model_id,
                            settings, cfg.seed)
    judge = instantiate(cfg.judge.backend)
    judgment_path = output_dir / "model_judgment" / f"{file_name(judge.name)}_single.jsonl"
    counts = write_judgments(questions, answers, cfg.model_id, judge, prompts, judgment_path, judge_settings(cfg),
                             settings.chunk_size, cfg.seed)
    print(f"mt_bench: {counts['judged']} judgments of {cfg.model_id} written, {counts['kept']} kept, "
          f"{counts['unrated']} unrated, {counts['failed']} failed requests -> {judgment_path}")
    table = score_table((row for _, row in read_jsonl(judgment_path)), {q.question_id: q.category for q in questions})
    report = output_dir / f"{file_name(judge.name)}_results"
    write_csv(table, report.with_suffix(".csv"))
    print(f"MT-Bench-style scores (1-10), judge {judge.name}:\n{format_table(table)}\n-> {report.with_suffix('.csv')}")
    if plot_categories(table, report.with_suffix(".png"), f"MT-Bench-style categories, judge {judge.name}"):
        print(f"-> {report.with_suffix('.png')}")
    else:
        print("no chart: matplotlib is not installed (pip install 'zephyr-lit[eval]')")
    return {row: table.scores[(row, cfg.model_id)] for row in table.rows if cfg.model_id in table.models}
