"""The judge's two requests, rating and critique, in both directions, and the parsers of its replies.

A rating request asks about one aspect of all ``n`` completions of a prompt; the reply holds, per text::

    ### Text 1                          ### Text 1
    Rating: 4                           Type: 1, 3
    Rationale: ...                      Rationale: ...
                                        Rating: 4
    (instruction_following, honesty)    Rationale For Rating: ...   (truthfulness, helpfulness)

Ratings are whole numbers 1-5; "N/A" only for ``NA_ASPECTS`` (the aspect cannot apply to the task).
Type codes: "0" none, else see ``rubric_text.TYPES``. A critique reply is ``Critique: ...`` then
``Overall score: 7`` (1-10, decimals allowed).

In a request each block (a prompt turn, a text) sits under a marker line ``===== Text 1 =====`` whose run
of equals signs is longer than any run in the contents, so the readers split the request back exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from zephyr_lit.distill.rubric_text import CRITIQUE_FORMAT, CRITIQUE_INTRO, SYSTEM, TYPES, rating_format, rating_intro

ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
TYPED_ASPECTS = ("truthfulness", "helpfulness")
NA_ASPECTS = ("instruction_following", "honesty")
RATINGS = ("1", "2", "3", "4", "5")
END = "End"
_INTROS = {aspect: rating_intro(aspect) for aspect in ASPECTS}


@dataclass(frozen=True)
class AspectRating:
    """One text's verdict on one aspect; ``types`` and ``rating_rationale`` only for ``TYPED_ASPECTS``."""

    rating: str  # "1".."5" or "N/A"
    rationale: str
    types: tuple[str, ...] | None = None  # e.g. ("1", "3"), ("0",) for none; () when the judge gave none
    rating_rationale: str | None = None  # "Rationale For Rating"


# ---- requests ----

def _check_aspect(aspect: str) -> None:
    if aspect not in ASPECTS:
        raise ValueError(f"unknown aspect {aspect!r}: expected one of {', '.join(ASPECTS)}")


def _user_message(intro: str, prompt: list[dict], blocks: list[tuple[str, str]], closing: str) -> str:
    """``intro``, the prompt turns and ``blocks`` (label, content) under marker lines, then ``closing``."""
    if not prompt:
        raise ValueError("the prompt conversation is empty")
    for i, turn in enumerate(prompt):
        ok = isinstance(turn, dict) and isinstance(turn.get("content"), str)
        if not ok or not re.fullmatch(r"\w+", str(turn.get("role"))):
            raise ValueError(f"prompt turn {i}: needs a one-word 'role' and a string 'content', got {turn!r}")
    blocks = [(f"Prompt: {t['role']}", t["content"]) for t in prompt] + blocks
    longest = max((len(run) for _, content in blocks for run in re.findall("=+", content)), default=0)
    fence = "=" * max(5, longest + 1)
    body = "".join(f"{fence} {label} {fence}\n{content}\n" for label, content in blocks)
    return f"{intro}\n\n{body}{fence} {END} {fence}\n\n{closing}"


def _read_user_message(messages: list[dict]) -> tuple[str, list[dict], list[tuple[str, str]]]:
    """The inverse of ``_user_message``: (intro, prompt turns, the other blocks)."""
    user = messages[-1].get("content", "") if messages else ""
    run = re.search("={5,}", user)
    if run is None:
        raise ValueError("not a judge request: no marker lines")
    head, *parts = user.split(run.group())
    pairs = list(zip(parts[0::2], parts[1::2]))
    if not head.endswith("\n\n") or len(parts) % 2 or not pairs or pairs[-1][0] != f" {END} ":
        raise ValueError("not a judge request: its blocks are not closed by the end marker")
    prompt, blocks = [], []
    for label, body in pairs[:-1]:
        framed = len(label) > 2 and label[0] == label[-1] == " " and len(body) >= 2 and body[0] == body[-1] == "\n"
        if not framed:
            raise ValueError(f"not a judge request: malformed block {label.strip()!r}")
        label, content = label[1:-1], body[1:-1]
        if label.startswith("Prompt: ") and not blocks:
            prompt.append({"role": label.removeprefix("Prompt: "), "content": content})
        else:
            blocks.append((label, content))
    return head[:-2], prompt, blocks


def rating_request(aspect: str, prompt: list[dict], texts: list[str]) -> list[dict]:
    """Chat messages asking the judge to rate ``texts`` (all replies to ``prompt``) on ``aspect``."""
    _check_aspect(aspect)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"rating_request needs one or more texts (strings), got {texts!r}")
    blocks = [(f"Text {i}", text) for i, text in enumerate(texts, 1)]
    user = _user_message(_INTROS[aspect], prompt, blocks, rating_format(aspect, len(texts)))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def read_rating_request(messages: list[dict]) -> tuple[str, list[dict], list[str]]:
    """(aspect, prompt, texts) of a ``rating_request`` (turns as {role, content}); ValueError for anything else."""
    intro, prompt, blocks = _read_user_message(messages)
    aspect = next((a for a in ASPECTS if _INTROS[a] == intro), None)
    if aspect is None:
        raise ValueError("not a rating request: its opening matches no aspect's rubric")
    if [label for label, _ in blocks] != [f"Text {i}" for i in range(1, len(blocks) + 1)] or not blocks:
        raise ValueError(f"rating request: expected blocks Text 1..n, got {[label for label, _ in blocks]}")
    return aspect, prompt, [content for _, content in blocks]


def critique_request(prompt: list[dict], text: str) -> list[dict]:
    """Chat messages asking the judge for a critique and an overall 1-10 score of one reply."""
    user = _user_message(CRITIQUE_INTRO, prompt, [("Response", text)], CRITIQUE_FORMAT)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def read_critique_request(messages: list[dict]) -> tuple[list[dict], str]:
    """(prompt, text) of a ``critique_request``; ValueError for anything else."""
    intro, prompt, blocks = _read_user_message(messages)
    if intro != CRITIQUE_INTRO or [label for label, _ in blocks] != ["Response"]:
        raise ValueError("not a critique request")
    return prompt, blocks[0][1]


def is_critique_request(messages: list[dict]) -> bool:
    """Whether ``messages`` came from ``critique_request`` (else, for our judges, a rating request)."""
    return bool(messages) and str(messages[-1].get("content", "")).startswith(CRITIQUE_INTRO + "\n\n")


# ---- reading replies ----

def _label_line(labels: str) -> re.Pattern[str]:
    """A line ``label: value`` as judges write it: bullets, ``#``, ``**Label:**``, ``Label (1-5):``."""
    mark = r"(?:\*{1,2}|_{1,2})"
    return re.compile(
        rf"^[ \t]*(?:[-+>][ \t]+|\d+[.)][ \t]+)?(?:\#+[ \t]*)?(?P<open>{mark})?[ \t]*(?P<label>{labels})"
        rf"[ \t]*(?:\([^)\n]*\))?[ \t]*{mark}?[ \t]*:(?(open)[ \t]*{mark}?)[ \t]*(?P<value>.*)$",
        re.I | re.M,
    )


_FIELD = _label_line(r"rationale[ \t]+for[ \t]+(?:the[ \t]+)?rating|rating|rationale|types?")
_SCORE = _label_line(r"(?:(?:overall|final|total)[ \t]+)?(?:score|rating)")
_CRITIQUE = _label_line(r"critique|feedback")
_TEXT_HEADER = re.compile(
    r"(?:[a-z]+\s+){0,3}?(?:text|response|completion|answer|output)\s*\#?\s*(\d+)"
    r"(?:\s*\([^)]*\))?(?:\s*[-–—]\s*[\w ,]{0,50})?", re.I)
_NUMBER = re.compile(r"(\d+(?:\.\d+)?)(?:\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?", re.I)


def _classify(line: str) -> tuple[str, object]:
    """("field", (key, value)) | ("text", k) | ("heading", None) | ("break", None) | ("line", line)."""
    if m := _FIELD.match(line):
        label = m["label"].lower()
        key = "rfr" if " " in label or "\t" in label else label.rstrip("s")
        return "field", (key, m["value"].strip())
    if not line.strip() or re.fullmatch(r"\s*([-*_])(\s*\1){2,}\s*", line):
        return "break", None
    core = re.sub(r"^(?:\d+[.)]|[-+>])\s+", "", re.sub(r"[#*_\[\]]", "", line).strip()).rstrip(": \t")
    if m := _TEXT_HEADER.fullmatch(core):
        return "text", int(m[1])
    return ("heading", None) if line.lstrip().startswith("#") else ("line", line)


def _records(reply: str, typed: bool) -> list[tuple[int | None, dict[str, str]]]:
    """(text label or None, fields) per record. A record ends at a text header, another heading, or a
    field it already has; a value runs on over plain lines until a blank line."""
    out: list[tuple[int | None, dict[str, str]]] = []
    label, rec, key = None, {}, None
    for line in reply.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        kind, value = _classify(line.rstrip())
        if kind == "field":
            field, text = value
            if typed and label and field == "rationale" and "rating" in rec and "rfr" not in rec:
                field = "rfr"  # a labelled section's second "Rationale:" is the one for the rating
            if field in rec or (field == ("type" if typed else "rating") and "rating" in rec):
                out.append((label, rec))
                rec = {}
            rec[field], key = text, field
        elif kind in ("text", "heading"):
            if rec:
                out.append((label, rec))
                rec = {}
            label = value if kind == "text" else (None if label is None else 0)
            key = None
        elif kind == "break":
            key = key if key and not rec[key] and not line.strip() else None  # skip blanks after "Label:"
        elif key:
            rec[key] = f"{rec[key]}\n{value}" if rec[key] else value.strip()
    return out + [(label, rec)] if rec else out


def _number(raw: str, top: int) -> float | None:
    """The leading number of ``4``, ``**4**``, ``4/5``, ``4 out of 5``, ``[[4]]`` if in 1..top (and "/top")."""
    m = _NUMBER.match(raw.lstrip(" \t*_`[(\"'"))
    if m is None or (m[2] is not None and float(m[2]) != top):
        return None
    return float(m[1]) if 1 <= float(m[1]) <= top else None


def _rating_value(aspect: str, raw: str) -> str | None:
    """"1".."5", or "N/A" (``n/a``, ``NA``, ``not applicable``) for ``NA_ASPECTS``; None if invalid."""
    if re.match(r"[ \t*_`\[(\"']*(?:n\s*/\s*a|na|not\s+applicable)\b", raw, re.I):
        return "N/A" if aspect in NA_ASPECTS else None
    number = None if re.match(r"\W*\d+\s*[-–]\s*\d", raw) else _number(raw, 5)  # "3-4" is no rating
    return str(int(number)) if number is not None and number.is_integer() else None


def _types_value(aspect: str, raw: str) -> tuple[str, ...]:
    """Sorted type codes from ``[1, 3]``, ``1, 3``, ``None``, ``0`` or the codes' names; () if none read."""
    value, known = raw.lower(), TYPES[aspect]
    codes = set(re.findall(r"\d+", value))
    if not codes and re.search(r"\b(?:none|n/a|no hallucination)\b", value):
        codes = {"0"}
    if not codes:
        codes = {c for c, (name, _) in known.items() if c != "0" and name.lower() in value}
    codes &= known.keys()
    return tuple(sorted(codes - {"0"} if len(codes) > 1 else codes))


def _aspect_rating(aspect: str, rec: dict[str, str]) -> AspectRating | None:
    rating, rationale = _rating_value(aspect, rec["rating"]), rec.get("rationale", "").strip()
    if rating is None:
        return None
    if aspect not in TYPED_ASPECTS:
        return AspectRating(rating, rationale)
    return AspectRating(rating, rationale, _types_value(aspect, rec.get("type", "")), rec.get("rfr", "").strip())


def parse_verdict(aspect: str, reply: str, n: int) -> list[AspectRating] | None:
    """The ratings of texts 1..n in ``reply``, or None when any is missing or out of range.

    With ``Text k`` headers the sections are matched by label (any order; labels outside 1..n and a
    repeated label's later sections are ignored). Without headers the reply must hold exactly ``n``
    ratings, taken in order: more is ambiguous and refused. A rationale ends at a blank line.
    """
    _check_aspect(aspect)
    records = [(label, rec) for label, rec in _records(reply, aspect in TYPED_ASPECTS) if "rating" in rec]
    if any(label for label, _ in records):
        chosen: dict[int, dict[str, str]] = {}
        for label, rec in records:
            if label and 1 <= label <= n:
                chosen.setdefault(label, rec)
        picked = [chosen.get(k) for k in range(1, n + 1)]
    else:
        picked = [rec for _, rec in records] if len(records) == n else [None]
    ratings = [_aspect_rating(aspect, rec) if rec else None for rec in picked]
    return None if None in ratings or not ratings else ratings


# ---- writing replies ----

def format_verdict(aspect: str, ratings: list[AspectRating]) -> str:
    """The reply an ideal judge writes for ``ratings`` (texts 1..n in order); ``parse_verdict`` reads it
    back unchanged, or this raises ValueError (rationales: stripped, no blank line, no label-like line)."""
    _check_aspect(aspect)
    typed, blocks = aspect in TYPED_ASPECTS, []
    for i, r in enumerate(ratings, 1):
        allowed = RATINGS + (("N/A",) if aspect in NA_ASPECTS else ())
        if r.rating not in allowed:
            raise ValueError(f"{aspect}, Text {i}: rating {r.rating!r} is not one of {', '.join(allowed)}")
        if typed != (r.types is not None and r.rating_rationale is not None):
            raise ValueError(f"{aspect}, Text {i}: types and rating_rationale are given exactly for "
                             f"{', '.join(TYPED_ASPECTS)}")
        if typed:
            fields = [f"Type: {', '.join(r.types)}", f"Rationale: {r.rationale}", f"Rating: {r.rating}",
                      f"Rationale For Rating: {r.rating_rationale}"]
        else:
            fields = [f"Rating: {r.rating}", f"Rationale: {r.rationale}"]
        body = "\n".join(fields)
        if parse_verdict(aspect, f"### Text 1\n{body}", 1) != [r]:
            raise ValueError(f"{aspect}, Text {i}: {r} would not read back unchanged (types must be sorted "
                             "known codes; rationales stripped, without blank lines or label-like lines)")
        blocks.append(f"### Text {i}\n{body}")
    return "\n\n".join(blocks)


def annotation(aspect: str, rating: AspectRating) -> dict:
    """UltraFeedback's annotation dict: {Rating, Rationale}, or for typed aspects
    {Type (list of str), Rationale, Rating, Rationale For Rating}."""
    _check_aspect(aspect)
    if aspect not in TYPED_ASPECTS:
        return {"Rating": rating.rating, "Rationale": rating.rationale}
    return {"Type": list(rating.types or ()), "Rationale": rating.rationale, "Rating": rating.rating,
            "Rationale For Rating": rating.rating_rationale or ""}


def numeric_ratings(annotations: dict[str, dict]) -> list[int]:
    """The 1-5 Ratings of one completion's annotations ({aspect: annotation}), in order, N/A left out."""
    out = []
    for aspect, ann in annotations.items():
        rating = str(ann.get("Rating", "")).strip()
        if rating.upper() == "N/A":
            continue
        if rating not in RATINGS:
            raise ValueError(f"annotation {aspect!r}: Rating {rating!r} is not 1-5 or N/A")
        out.append(int(rating))
    return out


# ---- critiques ----

def parse_critique(reply: str) -> tuple[str, float] | None:
    """(critique, score 1-10) from ``Critique: ...`` and ``Overall score: 7`` / ``Score: 7.5/10`` /
    ``[[7]]`` (the last labelled score line wins); None without a score in range."""
    text = reply.replace("\r\n", "\n").replace("\r", "\n")
    scores = list(_SCORE.finditer(text)) or list(re.finditer(r"\[\[\s*(?P<value>[\d.]+[^\]\n]*)\]\]", text))
    if not scores or (score := _number(scores[-1]["value"], 10)) is None:
        return None
    line = scores[-1]
    if (start := _CRITIQUE.search(text)) is not None:
        end = line.start() if line.start() > start.start() else len(text)
        critique = text[start.start("value"):end]
    else:
        critique = text[:line.start()] + text[line.end():]
    return critique.strip(), score


def format_critique(critique: str, score: int | float) -> str:
    """The reply an ideal judge writes; ``parse_critique`` reads it back unchanged or this raises."""
    if not 1 <= score <= 10:
        raise ValueError(f"critique score {score} is outside 1-10")
    number = int(score) if float(score).is_integer() else score
    reply = f"Critique: {critique}\nOverall score: {number}"
    if parse_critique(reply) != (critique, float(score)):
        raise ValueError(f"the critique {critique!r} would not read back unchanged: strip it")
    return reply
