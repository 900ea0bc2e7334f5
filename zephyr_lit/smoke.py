"""GPU smoke test: dSFT then dDPO of a ~95M-parameter Mistral with DeepSpeed ZeRO-3 and bf16-mixed
on one GPU (flash-attention 2 when installed), then one table of throughput and peak memory.

    python -m zephyr_lit.smoke                 # from the repository root, on a CUDA machine
    python -m zephyr_lit.smoke --steps 50 --root /tmp/smoke trainer.devices=2

Each stage is ``train.py`` in its own process (as a user runs it); extra arguments are Hydra
overrides for both stages. Figures come from each run's ``summary.json`` (rank 0).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stage_overrides(root: str, steps: int, flash: bool) -> dict[str, list[str]]:
    common = [
        "model=mistral_100m", "strategy=deepspeed_zero3", "trainer.accelerator=gpu", "trainer.devices=1",
        "trainer.precision=bf16-mixed", f"trainer.max_steps={steps}", f"paths.root={root}", "logger=csv",
        "trainer.enable_progress_bar=false",
    ] + (["model.attn_implementation=flash_attention_2"] if flash else [])
    return {
        "dsft": ["+experiment=dsft", "experiment_name=smoke-dsft", *common],
        "ddpo": ["+experiment=ddpo", "experiment_name=smoke-ddpo", *common, "model.random_init=false",
                 f"model.name_or_path={root}/smoke-dsft/latest/model", "model.tokenizer_name_or_path=null"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zephyr_lit.smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per stage")
    parser.add_argument("--root", default="outputs/smoke", help="paths.root of both runs")
    args, extra = parser.parse_known_args(argv)
    flash = importlib.util.find_spec("flash_attn") is not None
    rows = []
    for name, overrides in stage_overrides(str(Path(args.root).resolve()), args.steps, flash).items():
        command = [sys.executable, "train.py", *overrides, *extra]
        print("$ " + " ".join(command), flush=True)
        if subprocess.run(command, cwd=REPO).returncode != 0:
            print(f"error: the {name} stage failed (see its output above)", file=sys.stderr)
            return 1
        summary = json.loads((Path(args.root) / f"smoke-{name}" / "latest" / "summary.json").read_text())
        rows.append((name, summary["throughput"], summary["metrics"]))
    print(f"\nGPU smoke: ~95M Mistral, DeepSpeed ZeRO-3, bf16-mixed, attention "
          f"{'flash_attention_2' if flash else 'sdpa'}, {args.steps} steps per stage")
    print(f"{'stage':<6} {'rows/s':>9} {'tokens/s':>10} {'peak GiB':>9}  final validation")
    for name, speed, metrics in rows:
        key = "val/loss" if name == "dsft" else "val/rewards/accuracies"
        print(f"{name:<6} {speed.get('samples_per_s', float('nan')):>9.2f} {speed.get('tokens_per_s', float('nan')):>10.0f} "
              f"{speed.get('peak_memory_gib', float('nan')):>9.2f}  {key} {metrics.get(key, float('nan')):.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
