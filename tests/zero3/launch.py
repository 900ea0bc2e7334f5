"""Launch ``tests/zero3/run_zero3.py`` (``zephyr_lit.run.train`` under real ZeRO-3 on CPU processes) and
read what ``probe.Zero3Probe`` recorded on each rank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.distributed.process import run_group

REPO = Path(__file__).resolve().parents[2]


def run_zero3(tmp_path: Path, name: str, *overrides: str, devices: int = 2, timeout: float = 400) -> list[dict]:
    """``train`` on ``devices`` CPU ranks under ZeRO-3 with ``overrides``; the probe's facts per rank."""
    out = tmp_path / name
    cmd = [
        sys.executable, "tests/zero3/run_zero3.py", str(out / "probe"),
        f"paths.root={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", f"trainer.devices={devices}",
        "logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "data.exact_match_path=null", "optim.scheduler=constant", "optim.warmup_ratio=0",
        "strategy.config.zero_optimization.stage3_param_persistence_threshold=0", *overrides,
    ]
    result = run_group(cmd, timeout, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-3000:]
    return [json.loads((out / "probe" / f"rank{r}.json").read_text()) for r in range(devices)]
