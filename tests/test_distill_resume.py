"""Nothing lost, nothing done twice: ``completions`` and ``rate`` killed (SIGKILL) mid-stage and rerun with
the same command end with exactly the files of an uninterrupted run, and no unit is done twice."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.distributed.process import run_group
from zephyr_lit.distill.store import split_path

ROOT = Path(__file__).resolve().parents[1]
PERSONAS = ("courteous", "terse", "wrong_fact", "rude", "off_topic")


def distill(*overrides: str) -> subprocess.CompletedProcess:
    return run_group([sys.executable, "-m", "zephyr_lit.distill", *overrides], timeout=300, cwd=ROOT,
                     capture_output=True, text=True)


def dying_pool(marker: Path) -> str:
    """The scripted pool, its first member dying at its 4th call (the 4th chunk of prompts)."""
    members = [f"{{_target_:tests.distill.dying.DyingScripted,persona:{p},die_at:4,marker:'{marker}'}}"
               if i == 0 else f"{{_target_:zephyr_lit.distill.scripted.ScriptedBackend,persona:{p}}}"
               for i, p in enumerate(PERSONAS)]
    return "completions.pool=[" + ",".join(members) + "]"


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / ".work" / "records.jsonl").read_text().splitlines()]


def killed_then_rerun_equals_uninterrupted(stage_args: list[str], tmp_path: Path, unit: str) -> tuple[dict, dict]:
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    first = distill(*stage_args, f"output_dir={killed}")
    assert first.returncode == -9, first.stderr[-2000:]  # SIGKILL mid-stage
    partial = len(records(killed))
    assert partial > 0 and json.loads((killed / "manifest.json").read_text())["status"] == "running"
    rerun = distill(*stage_args, f"output_dir={killed}")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert distill(*stage_args, f"output_dir={whole}").returncode == 0  # the marker exists: nobody dies
    assert split_path(killed, "train").read_bytes() == split_path(whole, "train").read_bytes()
    keys = Counter((r["key"], r[unit]) for r in records(killed))
    assert max(keys.values()) == 1 and len(keys) == len(records(whole))  # nothing done twice, nothing lost
    done = {json.loads((f / "manifest.json").read_text())["counts"]["resumed"] for f in (killed, whole)}
    return {"partial": partial, "resumed": done}, json.loads((killed / "manifest.json").read_text())


@pytest.mark.slow
def test_completions_killed_and_rerun_equal_an_uninterrupted_run(tmp_path):
    args = ["stage=completions", "completions.chunk_size=100", dying_pool(tmp_path / "died")]
    facts, manifest = killed_then_rerun_equals_uninterrupted(args, tmp_path, "index")
    assert facts["partial"] >= 3 * 100 * 4 * 4 // 5  # three chunks of ~4/5 x 4 records per prompt written
    assert facts["resumed"] == {0, facts["partial"]} and manifest["status"] == "complete"


@pytest.mark.slow
def test_rate_killed_and_rerun_equal_an_uninterrupted_run(tmp_path):
    completions = tmp_path / "completions"
    assert distill("stage=completions", f"output_dir={completions}").returncode == 0
    args = ["stage=rate", f"input={completions}", "rate.chunk_size=50", "rate.critique=true",
            "judge.backend._target_=tests.distill.dying.DyingJudge", "+judge.backend.die_at=5",
            f"+judge.backend.marker={tmp_path / 'died'}"]
    facts, manifest = killed_then_rerun_equals_uninterrupted(args, tmp_path, "unit")
    assert facts["partial"] == 4 * 50 * (4 + 4)  # four chunks of 50 prompts x (4 aspects + 4 critiques)
    assert manifest["status"] == "complete" and manifest["counts"]["unrated"] == 0
