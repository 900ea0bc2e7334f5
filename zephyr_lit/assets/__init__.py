"""Bundled tiny assets: a Mistral-shaped config and tokenizer, and hub-shaped toy datasets.

Regenerate them with ``python -m zephyr_lit.assets.generate`` (deterministic).
"""

from __future__ import annotations

from pathlib import Path

from zephyr_lit.assets.pirate import sounds_like_pirate

ASSETS_DIR: Path = Path(__file__).resolve().parent

TINY_MODEL = "tiny-mistral"
SFT_DATA = "data/ultrachat_tiny"
PREF_DATA = "data/ultrafeedback_tiny"
EXACT_MATCH = "data/ultrachat_tiny/exact_match.jsonl"


def asset_path(name: str) -> str:
    """Absolute path of ``name`` (relative to the assets folder); FileNotFoundError when missing."""
    path = ASSETS_DIR / name
    if not path.exists():
        raise FileNotFoundError(
            f"bundled asset {name!r} not found at {path}; "
            "regenerate the assets with `python -m zephyr_lit.assets.generate`"
        )
    return str(path)


__all__ = [
    "ASSETS_DIR",
    "EXACT_MATCH",
    "PREF_DATA",
    "SFT_DATA",
    "TINY_MODEL",
    "asset_path",
    "sounds_like_pirate",
]
