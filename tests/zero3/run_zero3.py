"""Run ``zephyr_lit.run.train`` under real DeepSpeed ZeRO-3 on CPU processes (test-only strategy).

Usage: python tests/zero3/run_zero3.py <probe_dir> <hydra overrides...>
Lightning re-executes this command for rank 1, so it must be a script, run in a subprocess.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parents[1]))  # the repository root: callbacks from tests.* on the command line

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import open_dict  # noqa: E402

import zephyr_lit.config  # noqa: E402,F401
from zephyr_lit.run import train  # noqa: E402


def main(probe_dir: str, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(HERE.parents[1] / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["strategy=deepspeed_zero3", *overrides])
    with open_dict(cfg):
        cfg.strategy._target_ = "cpu_strategy.CPUDeepSpeedStrategy"
        cfg.trainer.accelerator = "cpu"
        cfg.callbacks.zero3_probe = {"_target_": "probe.Zero3Probe", "out": probe_dir}
    train(cfg, overrides, update_latest=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
