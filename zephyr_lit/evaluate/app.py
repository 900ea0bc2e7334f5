"""``evaluate(cfg)``: check the config, resolve the model and the output folder, run the task (``task=``).

Every task module has ``run_<task>(cfg, output_dir) -> dict`` and may have ``<task>_problems(cfg) ->
list[str]``; all problems (the common ones here and the task's) go out in one ``ConfigError`` before
anything is read or any model loads. Before the task runs, ``cfg.model_path`` holds the export folder
itself (a run folder's ``model/``, ``latest`` resolved) and ``cfg.model_id`` its name.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from zephyr_lit.errors import ConfigError

TASKS = ("mt_bench", "alpaca_eval", "prefs")
EXPORT = "model"  # the export's folder inside a training run folder
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name
MODEL_ID = re.compile(r"[\w.+-]+")  # it names files: model_answer/<model_id>.jsonl


@dataclass(frozen=True)
class ModelRef:
    """Where the model loads from (``path``: a local export folder or a hub name) and its ``model_id``."""

    path: str
    model_id: str
    local: bool


def resolve_model(model_path: str) -> ModelRef:
    """``model_path`` as an export folder: a run folder becomes its ``model/``, symlinks (``latest``) are
    resolved; the id is the run folder's name (the folder's own name when it is not in a run folder, the
    last part of a hub name)."""
    path = Path(model_path).expanduser()
    if not path.exists():
        return ModelRef(str(model_path), str(model_path).rstrip("/").split("/")[-1], local=False)
    path = path.resolve()
    if (path / EXPORT / "config.json").is_file() and not (path / "config.json").is_file():
        path = path / EXPORT  # a run folder
    named = path.parent if path.name == EXPORT else path
    return ModelRef(str(path), named.name, local=True)


def model_problems(model_path: object, model_id: object) -> list[str]:
    """``model_path`` is an export folder (or a run folder holding one) or a hub name; ``model_id`` can name a file."""
    problems = []
    if not model_path:
        problems.append("model_path is not set: point it at an export folder (e.g. outputs/dsft/latest/model) "
                        "or a hub name")
    elif Path(str(model_path)).expanduser().exists():
        ref = resolve_model(str(model_path))
        if not (Path(ref.path) / "config.json").is_file():
            problems.append(f"model_path={model_path}: no config.json in {ref.path}; point it at an export "
                            f"folder (a run folder's {EXPORT}/)")
    elif not HUB_NAME.fullmatch(str(model_path)):
        problems.append(f"model_path={model_path}: no such folder (train one with `python train.py`, "
                        f"or give an export folder or a hub name owner/name)")
    if model_id is not None and not MODEL_ID.fullmatch(str(model_id)):
        problems.append(f"model_id={model_id!r}: use letters, digits and . _ + - only (it names the answer file)")
    return problems


def task_module(task: str):
    """The task's module (``zephyr_lit.evaluate.<task>``); None when it is not installed."""
    try:
        return importlib.import_module(f"zephyr_lit.evaluate.{task}")
    except ModuleNotFoundError as error:
        if error.name != f"zephyr_lit.evaluate.{task}":
            raise
        return None


def task_function(task: str, kind: str) -> Callable | None:
    """``run_<task>`` (kind ``run``) or ``<task>_problems`` (kind ``problems``), None when absent."""
    module = task_module(task)
    name = f"run_{task}" if kind == "run" else f"{task}_problems"
    return getattr(module, name, None) if module is not None else None


def evaluate_problems(cfg: DictConfig) -> list[str]:
    """Every config problem, for one ConfigError before anything is read or loaded."""
    task = cfg.get("task")
    if task not in TASKS:
        return [f"task={task!r} is unknown; use one of {', '.join(TASKS)}"]
    if task_function(task, "run") is None:
        return [f"task={task} is not available in this installation"]
    problems = model_problems(cfg.get("model_path"), cfg.get("model_id"))
    if not cfg.get("output_dir"):
        problems.append("output_dir is not set: give the folder to write to")
    own = task_function(task, "problems")
    if own is not None:
        problems += own(cfg)
    return problems


def evaluate(cfg: DictConfig) -> dict:
    """Run the configured task; its results (the task's summary numbers)."""
    problems = evaluate_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    ref = resolve_model(str(cfg.model_path))
    cfg.model_path = ref.path
    cfg.model_id = str(cfg.model_id) if cfg.get("model_id") is not None else ref.model_id
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return task_function(cfg.task, "run")(cfg, output_dir)
