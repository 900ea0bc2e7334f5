"""Build Zephyr's data: teacher-written dialogues (UltraChat) and preference pairs from AI feedback (UltraFeedback).

    python -m zephyr_lit.distill                                   # completions for the embedded prompts
    python -m zephyr_lit.distill stage=rate input=DIR judge=openai # the judge rates every completion
    python -m zephyr_lit.distill stage=binarize input=DIR output_dir=PREFS binarize.ties=drop
    python -m zephyr_lit.distill +pipeline=feedback                # all three, one folder each
    python -m zephyr_lit.distill stage=dialogues input=seeds.txt   # UltraChat-style dialogues (dSFT data)
    python -m zephyr_lit.distill +pipeline=embedded                # dialogues -> completions -> rate -> binarize
    python -m zephyr_lit.distill -m stage=binarize input=DIR binarize.ties=keep,drop   # a sweep

See README.md, "Build preference data", and conf/distill.yaml for every key.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import zephyr_lit.config  # noqa: F401  (registers ${asset:...} and ${run_stamp:} before Hydra composes)
from zephyr_lit.errors import one_line_errors
from zephyr_lit.launch import pin_run_stamp


@hydra.main(version_base="1.3", config_path="../../conf", config_name="distill")
def main(cfg: DictConfig) -> None:
    from zephyr_lit.distill.app import distill

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:  # each job writes its own numbered sweep folder
        cfg.output_dir = hydra_cfg.runtime.output_dir
        if cfg.distributed.devices > 1:  # Lightning's children would rerun the whole sweep (issue #11300)
            print("error: a sweep (-m) runs each job in one process here: set distributed.devices=1, or launch "
                  "each job under torchrun / srun", file=sys.stderr)
            sys.exit(2)
    with one_line_errors():
        distill(cfg)


if __name__ == "__main__":
    pin_run_stamp()
    main()
