"""Train with zephyr-lit.

    python train.py +experiment=dsft                 # dSFT on the embedded default (CPU, minutes)
    python train.py +experiment=dsft optim.lr=1e-3   # any config key can be overridden
    python train.py -m +experiment=dsft optim.lr=1e-3,3e-3   # a Hydra sweep

See README.md for the config groups and the override keys.
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import zephyr_lit.config  # noqa: F401  (registers the ${asset:...} resolver before Hydra composes)
from zephyr_lit.errors import UserInputError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from zephyr_lit.run import train

    # Hydra's handlers already print and file every record: drop Lightning's own console handler
    # so that each message appears once.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:  # each job's folder is the sweep's numbered subfolder
        cfg.paths.output_dir = hydra_cfg.runtime.output_dir
    try:
        train(cfg, overrides=list(hydra_cfg.overrides.task), update_latest=not multirun)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
