"""zephyr-lit: the Zephyr-7B recipe (dSFT, then dDPO) in PyTorch Lightning with Hydra configs."""

__version__ = "0.1.0"
