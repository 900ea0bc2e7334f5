"""``distill(cfg)``: check the config, then run one stage (``stage=``) or a pipeline of them (``+pipeline=``).

Every stage reads its input first (a bad row is one line naming file, split, row and field), claims
its output folder (``store.StageStore``: a folder written under other settings is refused), builds
its backends (models load on first use) and runs. In a pipeline each stage writes
``output_dir/<FOLDERS[stage]>`` and the next one reads it (``NEXT_SPLITS``: completions after dialogues
reads the prompts of ``train_gen`` and ``test_gen``), unless ``pipeline.inputs.<stage>`` names its own.

Several processes (``distributed.devices``, ``ranks.py``): dialogues, completions and rate share
their prompts over the ranks, each appending to its own part file; rank 0 merges them into the final
files. instructions (sequential rounds) and binarize (no generation) run on rank 0.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from zephyr_lit.distill.binarize import BinarizeOptions, binarize, binarize_problems
from zephyr_lit.distill.completions import (CompletionsSettings, answer_prompts, completion_rows, completions_problems,
                                            first_prompts)
from zephyr_lit.distill.dialogues import DialoguesSettings, Speaker, dialogue_splits, dialogues_problems, write_dialogues
from zephyr_lit.distill.inputs import read_prompts, read_rated
from zephyr_lit.distill.ranks import Ranks, distributed_problems, run_shared, single_process_only, start_ranks
from zephyr_lit.distill.rate import RateSettings, rate_problems, rate_rows, rated_rows
from zephyr_lit.distill.store import StageOutput, StageStore
from zephyr_lit.errors import ConfigError, DataError
from zephyr_lit.generation import Sampling

log = logging.getLogger(__name__)

STAGES = ("instructions", "dialogues", "completions", "rate", "binarize")
FOLDERS = {"instructions": "instructions", "dialogues": "sft", "completions": "completions", "rate": "rated",
           "binarize": "prefs"}  # a pipeline's sub-folders
NEXT_SPLITS = {"dialogues": ["train_gen", "test_gen"]}  # what the next stage reads of a stage's output
FIRST_STAGES = ("instructions", "dialogues", "completions")  # stages with an embedded default input


def plain(node: object) -> object:
    """A config node as plain Python, interpolations resolved."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def completions_settings(cfg: DictConfig) -> CompletionsSettings:
    section = dict(plain(cfg.completions))
    section.pop("pool", None)
    return CompletionsSettings(**section)


def dialogues_settings(cfg: DictConfig) -> DialoguesSettings:
    section = {k: v for k, v in plain(cfg.dialogues).items() if k not in ("user", "assistant")}
    return DialoguesSettings(**{**section, "turns": tuple(section.get("turns") or ())})


def speaker(cfg: DictConfig, role: str) -> Speaker:
    side = cfg.dialogues[role]
    sampling = Sampling(side.get("temperature", 1.0), side.get("top_p", 1.0), side.get("max_new_tokens", 512))
    return Speaker(instantiate(side.backend), sampling, role)


def instructions_settings(cfg: DictConfig):
    from zephyr_lit.distill.instructions import InstructionsSettings  # rouge-score is imported only when used

    return InstructionsSettings(**{k: v for k, v in plain(cfg.instructions).items() if k != "writer"})


def instructions_problems_of(cfg: DictConfig) -> list[str]:
    from zephyr_lit.distill.instructions import instructions_problems

    return instructions_problems(instructions_settings(cfg))


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
    if stages and stages[0] not in FIRST_STAGES and cfg.input is None:
        problems.append(f"stage={stages[0]} needs input=<hub name, local folder or file> (the previous stage's output_dir)")
    problems += distributed_problems(plain(cfg.distributed))
    checks = {
        "instructions": lambda: instructions_problems_of(cfg),
        "dialogues": lambda: dialogues_problems(dialogues_settings(cfg)),
        "completions": lambda: completions_problems(completions_settings(cfg), len(cfg.completions.get("pool") or [])),
        "rate": lambda: rate_problems(rate_settings(cfg)),
        "binarize": lambda: binarize_problems(BinarizeOptions(**plain(cfg.binarize))),
    }
    for stage in (s for s in STAGES if s in stages):
        try:
            problems += checks[stage]()
        except TypeError as error:  # an unknown key in the section
            problems.append(f"{stage}: {error}")
    if "rate" in stages and not cfg.judge.get("backend"):
        problems.append("judge.backend is not set: pick judge=rule | openai | hf")
    return problems


def stage_settings(stage: str, cfg: DictConfig, source: str, split: object) -> dict:
    """What changes a stage's output (the manifest's hash leaves out the runtime keys)."""
    common = {"input": source, "input_split": split, "seed": cfg.seed}
    if stage == "rate":
        return {**common, "judge": plain(cfg.judge), "rate": plain(cfg.rate)}
    return {**common, stage: plain(cfg[stage])}  # each other stage's section has its name


def default_input(stage: str) -> tuple[str, str | list[str] | None]:
    """The embedded default's input of a first stage: the ultrachat_tiny conversations (their first
    user turns seed the dialogues; its test split seeds the instructions), else ultrafeedback_tiny."""
    from zephyr_lit.assets import PREF_DATA, SFT_DATA, asset_path

    if stage == "dialogues":
        return asset_path(SFT_DATA), None
    if stage == "instructions":
        return asset_path(SFT_DATA), "test_sft"
    return asset_path(PREF_DATA), None


def read_input(stage: str, cfg: DictConfig, source: str, split: object) -> tuple[list, dict]:
    """The stage's input items (prompts or rated rows), checked, and counts of what was merged."""
    if stage in FIRST_STAGES:
        prompts, duplicates = read_prompts(source, split, cfg.cache_dir, upto="first" if stage == "dialogues" else "last")
        if stage == "completions":
            kept = first_prompts(prompts, completions_settings(cfg).max_prompts)
            return kept, {"duplicates": duplicates, "left_out": len(prompts) - len(kept)}
        if stage == "dialogues" and cfg.dialogues.test_size >= len(prompts):
            raise DataError(f"{source}: dialogues.test_size={cfg.dialogues.test_size} but the input has only "
                            f"{len(prompts)} seed questions; lower dialogues.test_size")
        return prompts, {"duplicates": duplicates}
    return [row for _, row in read_rated(source, split, cfg.cache_dir)], {}


def share_work(stage: str, cfg: DictConfig, items: list, store: StageStore, ranks: Ranks) -> dict[str, int]:
    """This rank's share of a generating stage (its backends built here, on its own device)."""
    mine = ranks.share(items)
    if stage == "dialogues":
        user, assistant = speaker(cfg, "user"), speaker(cfg, "assistant")
        for side in (user, assistant):
            single_process_only(side.backend, ranks.world)
        return write_dialogues(mine, user, assistant, dialogues_settings(cfg), cfg.seed, store)
    if stage == "completions":
        pool = [instantiate(c) for c in cfg.completions.pool]
        for backend in pool:
            single_process_only(backend, ranks.world)
        return answer_prompts(mine, pool, completions_settings(cfg), cfg.seed, store)
    if stage == "rate":
        judge = instantiate(cfg.judge.backend)
        single_process_only(judge, ranks.world)
        return rate_rows(mine, judge, rate_settings(cfg), cfg.seed, store)
    return {}


def merge(stage: str, cfg: DictConfig, items: list, store: StageStore, source: str) -> StageOutput:
    """Rank 0: the stage's output from every rank's records (or the whole stage, for the unshared ones)."""
    if stage == "dialogues":
        return dialogue_splits(items, dialogues_settings(cfg), cfg.seed, store.done())
    if stage == "completions":
        rows = completion_rows(items, completions_settings(cfg), store.done())
        return StageOutput({"train": rows}, {"completions": sum(len(r["completions"]) for r in rows)})
    if stage == "rate":
        return StageOutput({"train": rated_rows(items, rate_settings(cfg), store.done())}, {})
    if stage == "instructions":
        from zephyr_lit.distill.instructions import run_instructions

        writer = instantiate(cfg.instructions.writer.backend)
        return run_instructions([p.instruction for p in items], writer, instructions_settings(cfg), cfg.seed, store)
    binarized = binarize(items, BinarizeOptions(**plain(cfg.binarize)), cfg.seed, source=source)
    return StageOutput(binarized.splits, binarized.counts)


def run_stage(stage: str, cfg: DictConfig, source: str, split: str | list[str] | None, folder: Path,
              ranks: Ranks | None = None) -> dict:
    """Run one stage from ``source`` (its ``split``s) into ``folder``; its counts. The input is read
    (and checked) before the folder is claimed and before any backend is built. Every rank makes the
    same collectives (``ranks.py``): after the check, the claim, the shares, and rank 0's merge."""
    ranks = ranks or Ranks()
    store = StageStore(folder, stage, stage_settings(stage, cfg, source, split), rank=ranks.rank)
    items, merged = read_input(stage, cfg, source, split)
    complete = store.check()
    ranks.gather(None)  # every rank has checked before rank 0 writes
    if complete:
        if ranks.main:
            print(f"{stage}: {store.folder} is already complete with these settings; nothing to do")
        return (store.manifest() or {}).get("counts", {})
    if ranks.main:
        store.claim()
    ranks.gather(None)  # the folder is claimed before any rank appends
    counts = run_shared(ranks, share_work, stage, cfg, items, store, ranks)
    outcome: tuple[str, object] = ("ok", None)
    if ranks.main:
        try:
            output = merge(stage, cfg, items, store, source)
            output.counts = {**counts, **output.counts, **merged}
            failed = output.counts.get("failed", 0)
            store.finish(output, complete=failed == 0)
            message = f"{stage}: wrote {folder} " + json.dumps(output.counts)
            if failed:
                message += f"; {failed} requests failed: rerun the same command to retry them"
            print(message)
            outcome = ("ok", output.counts)
        except Exception as error:
            ranks.announce(("error", f"rank 0: {type(error).__name__}: {error}"))
            raise
    kind, detail = ranks.announce(outcome)
    if kind == "error":
        raise ConfigError(f"{stage}: the merge on rank 0 failed: {detail}")
    return detail


def stage_input(cfg: DictConfig, stage: str, previous: tuple[str, object] | None) -> tuple[str, object]:
    """Where ``stage`` reads: ``pipeline.inputs.<stage>``, else the previous stage's output, else
    ``input``/``input_split``, else the embedded default."""
    pipeline = cfg.get("pipeline") or {}
    own = (pipeline.get("inputs") or {}).get(stage)
    if own is not None:
        return str(own.input), plain(own.get("split"))
    if previous is not None:
        return previous
    if cfg.input is not None:
        return str(cfg.input), plain(cfg.input_split)
    source, split = default_input(stage)
    return source, plain(cfg.input_split) if cfg.input_split is not None else split


def distill(cfg: DictConfig) -> dict[str, dict]:
    """Run the configured stage or pipeline; ``{stage: counts}``."""
    problems = distill_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    ranks = start_ranks(plain(cfg.distributed))
    results, previous = {}, None
    for stage in stages_of(cfg):
        folder = Path(cfg.output_dir) / FOLDERS[stage] if cfg.get("pipeline") else Path(cfg.output_dir)
        source, split = stage_input(cfg, stage, previous)
        results[stage] = run_stage(stage, cfg, source, split, folder, ranks)
        previous = (str(folder), NEXT_SPLITS.get(stage))  # the next stage reads this one's output
    return results
