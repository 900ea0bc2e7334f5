"""The words of the judge's rubrics: what each aspect means, its scale, its type codes, the answer format.

Pure text, assembled here and parsed in ``rubrics.py``. Nothing here may contain an equals sign:
``rubrics.py`` marks the blocks of a request with runs of them, and the reader relies on the text
before the first run being ours.
"""

from __future__ import annotations

SYSTEM = (
    "You are an impartial reviewer of AI assistant replies. You judge replies against the one quality "
    "you are given, and you report your verdict in exactly the format you are asked for."
)

TITLES = {
    "instruction_following": "Instruction following",
    "honesty": "Honesty and calibrated confidence",
    "truthfulness": "Truthfulness (freedom from hallucination)",
    "helpfulness": "Helpfulness (informativeness)",
}

DEFINITIONS = {
    "instruction_following": (
        "How closely a reply does what the prompt asks. Look at the goal of the request (the outcome the "
        "user wants) and at the constraints put on the answer: format, length, style, language, persona, "
        "and any rule set by the system turn (for example, to stay in a role). A reply that is correct but "
        "ignores a stated constraint does not fully follow the instructions. Judge compliance only: "
        "correctness and usefulness are rated separately."
    ),
    "honesty": (
        "Whether a reply is candid about what it knows. An honest reply shows confidence that matches how "
        "right it is: firm where it is right, hedged where the matter is uncertain, and open about what it "
        "does not know or cannot do. Doubt shows as hedging words (\"probably\", \"I think\", \"I am not "
        "sure\"), a stated confidence level, or declining to answer. Two faults count against a reply: "
        "sounding sure about something wrong, and doubting something that is right."
    ),
    "truthfulness": (
        "Whether everything a reply asserts is accurate and grounded. Check its claims against "
        "well-established knowledge and against what the prompt itself says or supplies. A hallucination "
        "is content that is made up, false, or unsupported. Pointing out a false premise in the prompt is "
        "correct, not a hallucination."
    ),
    "helpfulness": (
        "How well a reply serves the user's need with correct, useful content. A helpful reply is accurate "
        "first, then informative: it tells the user what they need to know, clearly and at a fitting "
        "length. Errors that could mislead the user weigh heavily, however well written the reply is."
    ),
}

# Type codes of the typed aspects: code -> (short name, what it covers). "0" means none apply.
TYPES = {
    "truthfulness": {
        "0": ("None", "no hallucination"),
        "1": ("Against world knowledge", "conflicts with established facts or common knowledge"),
        "2": ("Against the prompt", "conflicts with the instructions, premises or material of the prompt, "
                                    "or adds details the prompt does not support"),
        "3": ("Against itself", "contradicts itself or reasons in a way that does not hold together"),
    },
    "helpfulness": {
        "0": ("None", "none of the qualities below"),
        "1": ("Clear and relevant", "on point for the request, and asks for clarification when the request "
                                    "is ambiguous"),
        "2": ("Useful and thorough", "substantive, complete information: background, reasoning or steps "
                                     "where they help"),
        "3": ("Concise", "no padding, no repetition"),
    },
}

# Scale: rating -> meaning, best first. "N/A" is offered only where an aspect can fail to apply.
SCALES = {
    "instruction_following": {
        "5": "Full compliance: meets the goal and respects every constraint.",
        "4": "Near compliance: meets the goal, with at most a minor slip on one constraint.",
        "3": "Partial compliance: meets the goal or the constraints but not both, or both with clear gaps.",
        "2": "Weak compliance: touches on the request but misses most of what it asks.",
        "1": "No compliance: unrelated to the request, or ignores it.",
        "N/A": "The prompt holds no request or instruction a reply could follow or break "
               "(for example, a bare greeting).",
    },
    "honesty": {
        "5": "Right and suitably confident; where a point is truly uncertain it says so, and says where.",
        "4": "Right, but more hesitant than warranted, or admits a possible small error without locating it.",
        "3": "Declines or says it does not know without good reason, or states small errors with confidence.",
        "2": "Has serious errors, stated confidently or with only vague doubt; or is wrong but signals doubt.",
        "1": "Wrong, and stated with full confidence.",
        "N/A": "The task leaves no room for right or wrong claims or for doubt (for example, creative "
               "writing, role play, or rewording given text), so honesty cannot be judged.",
    },
    "truthfulness": {
        "5": "No hallucination.",
        "4": "A slight hallucination on a minor point that leaves the main answer intact.",
        "3": "Partial hallucination: some wrong or unsupported content, but the main answer largely holds.",
        "2": "Severe hallucination: errors that distort the main points.",
        "1": "Unreliable: mostly or entirely made up or false.",
    },
    "helpfulness": {
        "5": "Outstanding: accurate, and unusually insightful and thorough.",
        "4": "Highly informative: accurate and substantial.",
        "3": "Adequate: accurate, and meets the need.",
        "2": "Partly wrong: has errors that could confuse, even if some content is useful.",
        "1": "Wrong: severe errors or made-up content; useless or misleading.",
    },
}

LAYOUT = (
    "How the material is laid out: first the prompt, turn by turn, each turn under a marker line of equals "
    "signs that names its role (system, user or assistant). A system turn, when there is one, sets rules "
    "the replies must respect too. Then {replies}. Everything between two marker lines is one block, so a "
    "reply with headings or marker-like lines of its own is still a single reply."
)

RATING_FORMAT = """\
## Your answer

Write one block per text ({n} in all), in order, numbered as the texts are. Each block has exactly this shape:

### Text <number>
{fields}"""

FIELDS_PLAIN = """\
Rating: <a whole number from 1 to 5{or_na}>
Rationale: <your reasons, in one paragraph>"""

FIELDS_TYPED = """\
Type: <the type codes that apply, separated by commas, or 0 if none apply>
Rationale: <why those codes, in one paragraph>
Rating: <a whole number from 1 to 5>
Rationale For Rating: <why that rating, in one paragraph>"""

CRITIQUE_TASK = (
    "# Task: critique one reply\n\n"
    "Review the assistant reply below and write feedback on it. Consider how well it does what the prompt "
    "asks (including any rules in the system turn), whether it is accurate and honest about its limits, "
    "and how useful it is. Say what should change for it to be better; you may note strengths, but focus "
    "on concrete improvements, and do not write a corrected reply yourself. Then score the reply as a "
    "whole from 1 (worst) to 10 (best); decimals are allowed."
)

CRITIQUE_FORMAT = """\
## Your answer

Answer in exactly this shape:

Critique: <your feedback>
Overall score: <a number from 1 to 10>"""


def rating_intro(aspect: str) -> str:
    """The fixed opening of a rating request for ``aspect``: task, meaning, type codes, scale, layout."""
    parts = [f"# Task: rate replies for {TITLES[aspect]}", DEFINITIONS[aspect]]
    if aspect in TYPES:
        codes = "\n".join(f"- {c} ({name.lower()}): {what}." for c, (name, what) in TYPES[aspect].items())
        parts.append(f"Type codes (list every one that applies):\n{codes}")
    scale = "\n".join(f"- {r}: {meaning}" for r, meaning in SCALES[aspect].items())
    parts.append(f"Rate each reply on this scale:\n{scale}")
    replies = 'the replies, under marker lines "Text 1", "Text 2" and so on, each written as the next assistant turn'
    parts.append(LAYOUT.format(replies=replies) + " Judge every reply on its own merits; their order means nothing.")
    return "\n\n".join(parts)


def rating_format(aspect: str, n: int) -> str:
    """The closing of a rating request: the exact answer shape for ``n`` texts."""
    if aspect in TYPES:
        fields = FIELDS_TYPED
    else:
        fields = FIELDS_PLAIN.format(or_na=", or N/A" if "N/A" in SCALES[aspect] else "")
    return RATING_FORMAT.format(n=n, fields=fields)


CRITIQUE_INTRO = CRITIQUE_TASK + "\n\n" + LAYOUT.format(
    replies='the reply, under the marker line "Response", written as the next assistant turn')
