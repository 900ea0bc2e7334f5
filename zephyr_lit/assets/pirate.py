"""Recognise pirate voice in a reply: the check behind the Zephyr model card's pirate demo."""

from __future__ import annotations

import re

# Words that the generated plain replies never use and every generated pirate reply does
# (each one opens with "Arr", "Ahoy", "Avast" or "Yo ho"). "be" and "o'" are left out on
# purpose: plain English says "can be", and they would make the check depend on grammar.
PIRATE_MARKERS = (
    "arr+",
    "ahoy",
    "avast",
    "mateys?",
    "me hearty",
    "me hearties",
    "ye",
    "yer",
    "aye",
    "landlubbers?",
    "shiver me timbers",
    "yo[ -]ho",
)

_PIRATE_RE = re.compile(r"\b(?:" + "|".join(PIRATE_MARKERS) + r")\b", re.IGNORECASE)


def sounds_like_pirate(text: str) -> bool:
    """True when ``text`` contains at least one pirate marker word (case-insensitive, whole words)."""
    return _PIRATE_RE.search(text) is not None
