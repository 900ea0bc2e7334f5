"""``distill(cfg)``: check the config, then run one stage (``stage=``) or a pipeline of them (``+pipeline=``).

Every stage reads its input first (a bad row is one line naming file, split, row and field), claims
its output folder (``store.StageStore``: a folder written under other settings is refused), builds
its backends (models load on first use) and runs. In a pipeline each stage writes
``output_dir/<folder>`` and the next one reads it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from zephyr_lit.distill.binarize import BinarizeOptions, binarize, binarize_problems
from zephyr_lit.distill.completions import CompletionsSettings, completions_problems, run_completions
from zephyr_lit.distill.inputs import read_prompts, read_rated
from zephyr_lit.distill.rate import RateSettings, rate_problems, run_rate
from zephyr_lit.distill.store import StageOutput, StageStore
from zephyr_lit.errors import ConfigError

log = logging.getLogger(__name__)

STAGES = ("completions", "rate", "binarize")
FOLDERS = {"completions": "completions", "rate": "rated", "binarize": "prefs"}  # a pipeline's sub-folders


def plain(node: object) -> object:
    """A config node as plain Python, interpolations resolved."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def completions_settings(cfg: DictConfig) -> CompletionsSettings:
    section = dict(plain(cfg.completions))
    section.pop("pool", None)
    return CompletionsSettings(**section)


def rate_settings(cfg: DictConfig) -> RateSettings:
    judge = plain(cfg.judge)
    return RateSettings(**plain(cfg.rate), retries=judge.get("retries", 2), temperature=judge.get("temperature", 0.0),
                        max_new_tokens=judge.get("max_new_tokens", 1024))


def stages_of(cfg: DictConfig) -> list[str]:
    pipeline = cfg.get("pipeline")
    return list(pipeline.stages) if pipeline else [cfg.stage]


def distill_problems(cfg: DictConfig) -> list[str]:
    """Every config problem, for one ConfigError before anything is read or loaded."""
    stages = stages_of(cfg)
    problems = [f"stage={s!r} is unknown; use one of {', '.join(STAGES)}" for s in stages if s not in STAGES]
    if stages and stages[0] != "completions" and cfg.input is None:
        problems.append(f"stage={stages[0]} needs input=<hub name, local folder or file> (the previous stage's output_dir)")
    if "completions" in stages:
        try:
            settings = completions_settings(cfg)
            problems += completions_problems(settings, len(cfg.completions.get("pool") or []))
        except TypeError as error:
            problems.append(f"completions: {error}")
    if "rate" in stages:
        problems += rate_problems(rate_settings(cfg))
        if not cfg.judge.get("backend"):
            problems.append("judge.backend is not set: pick judge=rule | openai | hf")
    if "binarize" in stages:
        problems += binarize_problems(BinarizeOptions(**plain(cfg.binarize)))
    return problems


def stage_settings(stage: str, cfg: DictConfig, source: str, split: object) -> dict:
    """What changes a stage's output (the manifest's hash leaves out the runtime keys)."""
    common = {"input": source, "input_split": split, "seed": cfg.seed}
    if stage == "completions":
        return {**common, "completions": plain(cfg.completions)}
    if stage == "rate":
        return {**common, "judge": plain(cfg.judge), "rate": plain(cfg.rate)}
    return {**common, "binarize": plain(cfg.binarize)}


def default_input() -> str:
    from zephyr_lit.assets import PREF_DATA, asset_path

    return asset_path(PREF_DATA)


def run_stage(stage: str, cfg: DictConfig, source: str, split: str | list[str] | None, folder: Path) -> dict:
    """Run one stage from ``source`` (its ``split``s) into ``folder``; its counts. The input is read
    (and checked) before the folder is claimed and before any backend is built."""
    store = StageStore(folder, stage, stage_settings(stage, cfg, source, split))
    if stage == "completions":
        prompts, duplicates = read_prompts(source, split, cfg.cache_dir)
    else:
        rows = [row for _, row in read_rated(source, split, cfg.cache_dir)]
    if store.open():
        print(f"{stage}: {store.folder} is already complete with these settings; nothing to do")
        return (store.manifest() or {}).get("counts", {})
    if stage == "completions":
        pool = [instantiate(c) for c in cfg.completions.pool]
        output = run_completions(prompts, pool, completions_settings(cfg), cfg.seed, store)
        output.counts["duplicates"] = duplicates
    elif stage == "rate":
        output = run_rate(rows, instantiate(cfg.judge.backend), rate_settings(cfg), cfg.seed, store)
    else:
        binarized = binarize(rows, BinarizeOptions(**plain(cfg.binarize)), cfg.seed, source=source)
        output = StageOutput(binarized.splits, binarized.counts)
    failed = output.counts.get("failed", 0)
    store.finish(output, complete=failed == 0)
    message = f"{stage}: wrote {folder} " + json.dumps(output.counts)
    if failed:
        message += f"; {failed} requests failed: rerun the same command to retry them"
    print(message)
    return output.counts


def distill(cfg: DictConfig) -> dict[str, dict]:
    """Run the configured stage or pipeline; ``{stage: counts}``."""
    problems = distill_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    stages = stages_of(cfg)
    source = cfg.input if cfg.input is not None else default_input()
    split = plain(cfg.input_split)
    results = {}
    for stage in stages:
        folder = Path(cfg.output_dir) / FOLDERS[stage] if cfg.get("pipeline") else Path(cfg.output_dir)
        results[stage] = run_stage(stage, cfg, str(source), split, folder)
        source, split = str(folder), None  # the next stage reads this one's output
    return results
