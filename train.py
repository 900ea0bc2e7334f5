"""Train with zephyr-lit.

    python train.py +experiment=dsft                 # dSFT on the embedded default (CPU, minutes)
    python train.py +experiment=dsft optim.lr=1e-3   # any config key can be overridden
    python train.py -m +experiment=dsft optim.lr=1e-3,3e-3   # a Hydra sweep

See README.md for the config groups and the override keys.
"""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import zephyr_lit.config  # noqa: F401  (registers ${asset:...} and ${run_stamp:} before Hydra composes)
from zephyr_lit.errors import UserInputError, one_line_errors
from zephyr_lit.launch import lightning_spawns, multirun_spawn_error, pin_run_stamp


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
    with one_line_errors():
        # Lightning would start the other local ranks by re-running sys.argv, `-m` and all: each child
        # would start the sweep again (Lightning #11300). Only a cluster (srun, torchrun) may create them.
        if multirun and lightning_spawns(cfg.trainer, cfg.strategy):
            raise UserInputError(multirun_spawn_error())
        train(cfg, overrides=list(hydra_cfg.overrides.task), update_latest=not multirun)


if __name__ == "__main__":
    pin_run_stamp()  # one process: ZEPHYR_RUN_ID=<timestamp>, inherited by any process started from it
    main()
