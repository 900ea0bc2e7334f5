"""``python -m zephyr_lit.evaluate``: MT-Bench and AlpacaEval answers and judging, preference accuracy."""
