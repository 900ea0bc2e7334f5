"""``python -m zephyr_lit.plan [Hydra overrides] [--gpu-memory-gib G] [--world-size W] [--arch A]``."""

from __future__ import annotations

import argparse
import sys

from zephyr_lit.errors import UserInputError
from zephyr_lit.plan.report import plan_from_overrides, render


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m zephyr_lit.plan",
        description="Per-GPU memory plan of a run: the same Hydra overrides as train.py.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +experiment=zephyr-7b-beta-dsft")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80: A100-80GB)")
    parser.add_argument(
        "--world-size", type=int, default=None, help="GPUs in all (default trainer.devices x trainer.num_nodes)"
    )
    parser.add_argument(
        "--arch", default=None, help="model shape: a name in the built-in table or a folder with config.json"
    )
    parser.add_argument(
        "--context-gib", type=float, default=1.0, help="fixed CUDA context / NCCL allowance (default 1)"
    )
    parser.add_argument("--overhead-fraction", type=float, default=0.10, help="fragmentation allowance (default 0.10)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print the plan; 2 with a one-line error for bad input."""
    args = parse_args(argv)
    try:
        plan, name = plan_from_overrides(
            args.overrides,
            world_size=args.world_size,
            arch=args.arch,
            gpu_memory_gib=args.gpu_memory_gib,
            context_gib=args.context_gib,
            overhead_fraction=args.overhead_fraction,
        )
    except UserInputError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(render(plan, title=" ".join(args.overrides) or "default config", model_name=name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
