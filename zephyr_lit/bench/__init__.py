"""Benchmark: zephyr-lit vs TRL at equal settings (``python -m zephyr_lit.bench --help``)."""
