"""The judge of both tasks: distill's backends (``judge=rule | openai | hf``), its settings and its questions.

Each judge question is a ``rate.Unit`` asked through ``rate.ask``, the one retry loop of the project:
an unreadable reply is asked again ``judge.retries`` times, each with its own seed, then counted as
unrated; a request that fails outright gets no record, so a rerun asks it again.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from zephyr_lit.distill.judge_templates import JudgePrompt
from zephyr_lit.distill.rate import Unit, ask
from zephyr_lit.generation import Backend, ChatRequest, Sampling, request_seed

RULE_TARGET = "zephyr_lit.distill.scripted.RuleJudge"


@dataclass(frozen=True)
class JudgeSettings:
    """How the judge is asked (``judge.retries``, ``judge.temperature``, ``judge.max_new_tokens``)."""

    retries: int = 2
    temperature: float = 0.0
    max_new_tokens: int = 1024


def judge_settings(cfg: DictConfig) -> JudgeSettings:
    judge = cfg.judge
    return JudgeSettings(judge.get("retries", 2), judge.get("temperature", 0.0), judge.get("max_new_tokens", 1024))


def judge_problems(cfg: DictConfig, shipped_prompts: str) -> list[str]:
    """The judge's config problems; the rule judge reads back only the shipped judge prompts."""
    problems = []
    if not cfg.judge.get("backend"):
        return ["judge.backend is not set: pick judge=rule | openai | hf"]
    settings = judge_settings(cfg)
    if settings.retries < 0:
        problems.append(f"judge.retries={settings.retries} must be at least 0")
    if settings.max_new_tokens < 1:
        problems.append(f"judge.max_new_tokens={settings.max_new_tokens} must be at least 1")
    is_rule = OmegaConf.select(cfg, "judge.backend._target_") == RULE_TARGET
    if is_rule and cfg.get("judge_prompts") and Path(str(cfg.judge_prompts)).resolve() != Path(shipped_prompts):
        problems.append(f"judge=rule grades with the project's judge prompts only ({shipped_prompts}); drop "
                        f"judge_prompts={cfg.judge_prompts}, or use judge=openai | hf with it")
    return problems


def file_name(name: str) -> str:
    """``name`` (a judge's or model's) made safe as a file name: anything but letters, digits and ``.+-_`` -> ``_``."""
    return re.sub(r"[^\w.+-]", "_", name)


def judge_unit(key: str, name: str, prompt: JudgePrompt, fields: dict[str, str], parse: Callable[[str], object],
               settings: JudgeSettings, seed: int) -> Unit:
    """One judge question: ``prompt`` filled with ``fields``; the record holds the verdict (``parse``d from
    the reply, None: unreadable), the reply (``judgment``) and the filled prompt (``user_prompt``)."""
    messages = prompt.messages(**fields)
    sampling = Sampling(settings.temperature, 1.0, settings.max_new_tokens)

    def read(reply: str) -> dict | None:
        verdict = parse(reply)
        return None if verdict is None else {"verdict": verdict, "judgment": reply}

    def request(attempt: int) -> ChatRequest:
        return ChatRequest(messages, sampling, request_seed(seed, key, name, attempt))

    return Unit(key, name, request, read)


def user_prompt(unit: Unit) -> str:
    """The filled template the unit sends (its last user turn)."""
    return unit.request(0).messages[-1]["content"]


def ask_judge(judge: Backend, units: list[Unit], settings: JudgeSettings, counts: dict[str, int]) -> dict[tuple, dict]:
    """``(key, unit name) -> record`` for every unit the judge answered (an unrated one has no ``verdict``)."""
    for counter in ("failed", "parse_retries", "unrated"):
        counts.setdefault(counter, 0)
    return {(r["key"], r["unit"]): r for r in ask(judge, units, settings.retries, counts)}
