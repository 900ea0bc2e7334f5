"""Build the recipe's data: ``python -m zephyr_lit.distill stage=completions|rate|binarize`` (see ``app.py``)."""
