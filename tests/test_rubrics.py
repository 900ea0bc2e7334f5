"""The judge's requests read back exactly, and its replies, ideal or messy, parse to the ratings meant."""

import random

import pytest

from zephyr_lit.distill import rubric_text
from zephyr_lit.distill.rubrics import (
    ASPECTS,
    NA_ASPECTS,
    TYPED_ASPECTS,
    AspectRating,
    annotation,
    critique_request,
    format_critique,
    format_verdict,
    is_critique_request,
    numeric_ratings,
    parse_critique,
    parse_verdict,
    rating_request,
    read_critique_request,
    read_rating_request,
)

PIRATE = [{"role": "system", "content": "Answer as a pirate."}, {"role": "user", "content": "What is 2+2?"}]
EMPTY_SYSTEM = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]
MULTI_TURN = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue.\n\n===== Text 1 =====\nnot a marker"},
    {"role": "user", "content": "Another, in\r\nWindows lines."},
]
TRICKY_TEXTS = [
    "Arr, it be 4.",
    "Line one\nline two\n\n### Text 2\n**Rating:** 5\n",
    "",
    "\n  leading and trailing blanks  \n\n",
    "Setext\n======\n# Heading\n========== ten\n=====",
    "Compare with Text 2 and Text 1.\r\n```python\nx == y\n```",
]


@pytest.mark.parametrize("aspect", ASPECTS)
@pytest.mark.parametrize("prompt", [PIRATE, EMPTY_SYSTEM, MULTI_TURN], ids=["system", "empty-system", "multi-turn"])
def test_a_rating_request_reads_back_exactly(aspect, prompt):
    messages = rating_request(aspect, prompt, TRICKY_TEXTS)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert read_rating_request(messages) == (aspect, prompt, TRICKY_TEXTS)
    assert not is_critique_request(messages)


def test_random_contents_read_back_exactly():
    rng = random.Random(0)
    pieces = ["=", "==", "=====", "\n", "\r\n", " ", "Text 2", "Prompt: user", "End", "#", "**", "x", "é", "\t"]

    def text() -> str:
        return "".join(rng.choice(pieces) for _ in range(rng.randrange(12)))

    for _ in range(200):
        prompt = [{"role": rng.choice(["system", "user", "assistant"]), "content": text()} for _ in range(3)]
        texts = [text() for _ in range(rng.randrange(1, 5))]
        aspect = rng.choice(ASPECTS)
        assert read_rating_request(rating_request(aspect, prompt, texts)) == (aspect, prompt, texts)
        assert read_critique_request(critique_request(prompt, texts[0])) == (prompt, texts[0])


def test_one_text_and_no_system_prompt_read_back():
    prompt = [{"role": "user", "content": "Hi"}]
    assert read_rating_request(rating_request("honesty", prompt, ["Hello"])) == ("honesty", prompt, ["Hello"])


def test_the_request_shows_the_system_prompt_and_numbered_texts_under_marker_lines():
    user = rating_request("instruction_following", PIRATE, ["Arr, 4.", "4"])[1]["content"]
    assert "===== Prompt: system =====\nAnswer as a pirate.\n===== Prompt: user =====\nWhat is 2+2?\n" in user
    assert "===== Text 1 =====\nArr, 4.\n===== Text 2 =====\n4\n===== End =====\n\n## Your answer" in user
    assert "N/A" in user and "Rating: <a whole number from 1 to 5, or N/A>" in user


def test_markers_outgrow_any_run_of_equals_signs_in_the_contents():
    user = rating_request("honesty", PIRATE, ["a ========== b"])[1]["content"]
    assert "=========== Text 1 ===========\na ========== b\n" in user


@pytest.mark.parametrize("aspect", ASPECTS)
def test_rubric_text_is_free_of_equals_signs_and_offers_na_only_where_allowed(aspect):
    words = rubric_text.rating_intro(aspect) + rubric_text.rating_format(aspect, 3) + rubric_text.SYSTEM
    assert "=" not in words and "=" not in rubric_text.CRITIQUE_INTRO + rubric_text.CRITIQUE_FORMAT
    assert ("N/A" in words) == (aspect in NA_ASPECTS)
    assert ("Type:" in words) == (aspect in TYPED_ASPECTS)


def test_critique_request_reads_back_and_is_told_apart():
    text = "Line\n===== Response =====\n\n"
    messages = critique_request(MULTI_TURN, text)
    assert is_critique_request(messages)
    assert read_critique_request(messages) == (MULTI_TURN, text)
    with pytest.raises(ValueError, match="not a rating request"):
        read_rating_request(messages)
    with pytest.raises(ValueError, match="not a critique request"):
        read_critique_request(rating_request("honesty", PIRATE, ["x"]))


@pytest.mark.parametrize("messages", [[], [{"role": "user", "content": "Rate this: 4"}]])
def test_foreign_messages_are_refused(messages):
    assert not is_critique_request(messages)
    with pytest.raises(ValueError, match="not a judge request"):
        read_rating_request(messages)


def test_bad_requests_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown aspect 'style'"):
        rating_request("style", PIRATE, ["x"])
    with pytest.raises(ValueError, match="one or more texts"):
        rating_request("honesty", PIRATE, [])
    with pytest.raises(ValueError, match="prompt turn 1"):
        rating_request("honesty", [{"role": "user", "content": "a"}, {"role": "two words", "content": "b"}], ["x"])


PLAIN = [AspectRating("4", "Follows the persona.\nMisses the length limit."), AspectRating("N/A", ""),
         AspectRating("1", "Ignores the request; see **Text 1** for contrast.")]
TYPED = [AspectRating("5", "No errors.", ("0",), "Accurate."), AspectRating("2", "Wrong date.", ("1", "3"), "Bad."),
         AspectRating("3", "", (), "")]


def test_the_exact_output_format():
    assert format_verdict("honesty", PLAIN[:2]) == (
        "### Text 1\nRating: 4\nRationale: Follows the persona.\nMisses the length limit.\n\n"
        "### Text 2\nRating: N/A\nRationale: "
    )
    assert format_verdict("truthfulness", TYPED[1:2]) == (
        "### Text 1\nType: 1, 3\nRationale: Wrong date.\nRating: 2\nRationale For Rating: Bad."
    )


@pytest.mark.parametrize(("aspect", "ratings"), [("instruction_following", PLAIN), ("honesty", PLAIN),
                                                 ("truthfulness", TYPED), ("helpfulness", TYPED)])
def test_format_then_parse_gives_the_ratings_back(aspect, ratings):
    assert parse_verdict(aspect, format_verdict(aspect, ratings), len(ratings)) == ratings


def test_the_rule_judge_path_runs_offline_end_to_end():
    aspect, _, texts = read_rating_request(rating_request("helpfulness", PIRATE, ["Arr, 4.", "Five."]))
    verdict = [AspectRating("5" if "4" in t else "1", f"Judged {t!r}.", ("1",), "By rule.") for t in texts]
    assert parse_verdict(aspect, format_verdict(aspect, verdict), len(texts)) == verdict


@pytest.mark.parametrize(("aspect", "rating", "match"), [
    ("truthfulness", AspectRating("N/A", "x", ("0",), "y"), "not one of 1, 2, 3, 4, 5"),
    ("honesty", AspectRating("6", "x"), "not one of"),
    ("honesty", AspectRating("4", "x", ("1",), "y"), "exactly for truthfulness, helpfulness"),
    ("helpfulness", AspectRating("4", "x"), "exactly for"),
    ("honesty", AspectRating("4", "first paragraph\n\nsecond"), "would not read back"),
    ("honesty", AspectRating("4", "ok\nRating: 5"), "would not read back"),
    ("honesty", AspectRating("4", " padded "), "would not read back"),
    ("helpfulness", AspectRating("4", "x", ("3", "1"), "y"), "would not read back"),
    ("helpfulness", AspectRating("4", "x", ("0", "1"), "y"), "would not read back"),
])
def test_format_verdict_refuses_what_would_not_read_back(aspect, rating, match):
    with pytest.raises(ValueError, match=match):
        format_verdict(aspect, [rating])


def plain(*pairs):
    return [AspectRating(r, why) for r, why in pairs]


MESSY_PLAIN = [
    ("preamble, bold labels, closing remark",
     "Here is my evaluation.\n\n### Text 1\n**Rating:** 4\n**Rationale:** Good.\n\n#### Text 2:\nRating: **2**\n"
     "Rationale: Weak.\n\nOverall, Text 1 is better.", plain(("4", "Good."), ("2", "Weak."))),
    ("bold headers, 4/5, parenthesis, [[4]]",
     "**Output for Text 1**\nRating: 4/5 (good)\nRationale: a\n\n**Output for Text 2**\nRating: [[5]]\nRationale: b",
     plain(("4", "a"), ("5", "b"))),
    ("lower case, windows newlines, extra blank lines",
     "text 1\r\n\r\n\r\nrating: 1\r\n\r\nrationale: off topic\r\n\r\ntext 2\r\nrating: n/a\r\nrationale: no ask",
     plain(("1", "off topic"), ("N/A", "no ask"))),
    ("NA, rationale over lines, value on the next line",
     "Text 1\nRating:\n5\nRationale: first line\nsecond line\n  third, indented\n\nText 2\nRating: NA\n"
     "Rationale: creative task", plain(("5", "first line\nsecond line\n  third, indented"), ("N/A", "creative task"))),
    ("labelled out of order", "### Text 2\nRating: 2\nRationale: b\n\n### Text 1\nRating: 1\nRationale: a",
     plain(("1", "a"), ("2", "b"))),
    ("labels past n ignored",
     "Text 1\nRating: 3\nRationale: a\nText 2\nRating: 4\nRationale: b\nText 3\nRating: 9\nRationale: extra",
     plain(("3", "a"), ("4", "b"))),
    ("unlabelled, exactly n, list bullets",
     "- Rating: 2\n- Rationale: a\n- Rating: 5 out of 5\n- Rationale: b", plain(("2", "a"), ("5", "b"))),
    ("unlabelled, rationale first", "Rationale: a\nRating: 2\n\nRationale: b\nRating: 3",
     plain(("2", "a"), ("3", "b"))),
    ("a later heading ends the last section",
     "## Text 1\nRating: 4\nRationale: a\n## Text 2\nRating: 3\nRationale: b\n## Summary\nRating: 1\nRationale: z",
     plain(("4", "a"), ("3", "b"))),
    ("rationale mentions another text, parenthesised label", "Text 1 (assistant A)\nRating (1-5): 4\nRationale: "
     "better than Text 2.\nText 2 - weaker\nRating: 2\nRationale: worse.", plain(("4", "better than Text 2."),
                                                                                 ("2", "worse."))),
    ("UltraFeedback-style headers, not applicable",
     "#### Output for Text 1\nRating: 5\nRationale: a\n\n#### Output for Text 2\nRating: Not applicable\nRationale: b",
     plain(("5", "a"), ("N/A", "b"))),
    ("a numbered list of bold headers",
     "Here you go:\n\n1. **Text 1**\n   - **Rating:** 4\n   - **Rationale:** ok\n2. **Text 2**\n   - **Rating:** 3\n"
     "   - **Rationale:** meh", plain(("4", "ok"), ("3", "meh"))),
    ("out of range 0", "Text 1\nRating: 0\nRationale: a\nText 2\nRating: 3\nRationale: b", None),
    ("out of range 6", "Text 1\nRating: 6\nRationale: a\nText 2\nRating: 3\nRationale: b", None),
    ("out of ten", "Text 1\nRating: 7/10\nRationale: a\nText 2\nRating: 3\nRationale: b", None),
    ("a fraction", "Text 1\nRating: 3.5\nRationale: a\nText 2\nRating: 3\nRationale: b", None),
    ("a range", "Text 1\nRating: 3-4\nRationale: a\nText 2\nRating: 3\nRationale: b", None),
    ("words", "Text 1\nRating: good\nRationale: a\nText 2\nRating: 3\nRationale: b", None),
    ("fewer than n", "Text 1\nRating: 3\nRationale: a", None),
    ("a labelled text missing", "Text 1\nRating: 3\nRationale: a\nText 3\nRating: 3\nRationale: c", None),
    ("unlabelled, more than n", "Rating: 1\nRationale: a\nRating: 2\nRationale: b\nRating: 3\nRationale: c", None),
    ("no ratings at all", "I cannot rate these texts.", None),
]


@pytest.mark.parametrize(("reply", "expected"), [case[1:] for case in MESSY_PLAIN], ids=[c[0] for c in MESSY_PLAIN])
def test_messy_instruction_following_replies(reply, expected):
    assert parse_verdict("instruction_following", reply, 2) == expected


def test_na_is_refused_for_the_typed_aspects():
    reply = "Text 1\nType: 0\nRationale: a\nRating: N/A\nRationale For Rating: b"
    assert parse_verdict("truthfulness", reply, 1) is None


MESSY_TYPED = [
    ("list, None, bold", "### Text 1\n**Type:** [1, 3]\n**Rationale:** a\n**Rating:** 2\n**Rationale For Rating:** b"
     "\n\n### Text 2\nType: None\nRationale: c\nRating: 5/5\nRationale for rating: d",
     [AspectRating("2", "a", ("1", "3"), "b"), AspectRating("5", "c", ("0",), "d")]),
    ("bare codes, 0, names, unlabelled",
     "Type: 1, 3\nRationale: a\nRating: 3\nRationale For Rating: b\n\nType: 0\nRationale: c\nRating: 4\n"
     "Rationale For Rating: d", [AspectRating("3", "a", ("1", "3"), "b"), AspectRating("4", "c", ("0",), "d")]),
    ("unlabelled, the first text has no Type", "Rationale: a\nRating: 3\nRationale For Rating: b\nType: 2\n"
     "Rationale: c\nRating: 4\nRationale For Rating: d",
     [AspectRating("3", "a", (), "b"), AspectRating("4", "c", ("2",), "d")]),
    ("codes with names, unknown code dropped, 0 with others dropped",
     "Text 1\nTypes: 2 (against the prompt), 7\nRationale: a\nRating: 3\nRationale For Rating: b\n\nText 2\n"
     "Type: 0, 1\nRationale: c\nRating: 1\nRationale For Rating: d",
     [AspectRating("3", "a", ("2",), "b"), AspectRating("1", "c", ("1",), "d")]),
    ("a labelled section's second Rationale is the one for the rating",
     "Text 1\nType: 1\nRationale: a\nRating: 3\nRationale: b\n\nText 2\nType: 2\nRationale: c\nRating: 4\nRationale: d",
     [AspectRating("3", "a", ("1",), "b"), AspectRating("4", "c", ("2",), "d")]),
    ("missing fields give empty ones", "Text 1\nRating: 4\nText 2\nRating: 5",
     [AspectRating("4", "", (), ""), AspectRating("5", "", (), "")]),
]


@pytest.mark.parametrize(("reply", "expected"), [case[1:] for case in MESSY_TYPED], ids=[c[0] for c in MESSY_TYPED])
def test_messy_truthfulness_replies(reply, expected):
    assert parse_verdict("truthfulness", reply, 2) == expected


def test_helpfulness_types_by_name():
    reply = "Text 1\nType: Clear and relevant; concise\nRationale: a\nRating: 4\nRationale For Rating: b"
    assert parse_verdict("helpfulness", reply, 1) == [AspectRating("4", "a", ("1", "3"), "b")]


def test_annotations_and_their_numeric_ratings():
    honesty, truth = annotation("honesty", AspectRating("N/A", "fiction")), annotation("truthfulness", TYPED[1])
    assert honesty == {"Rating": "N/A", "Rationale": "fiction"}
    assert truth == {"Type": ["1", "3"], "Rationale": "Wrong date.", "Rating": "2", "Rationale For Rating": "Bad."}
    follow = annotation("instruction_following", PLAIN[0])
    assert numeric_ratings({"instruction_following": follow, "honesty": honesty, "truthfulness": truth}) == [4, 2]
    with pytest.raises(ValueError, match="annotation 'honesty': Rating '7'"):
        numeric_ratings({"honesty": {"Rating": "7", "Rationale": ""}})


@pytest.mark.parametrize(("reply", "expected"), [
    ("Critique: Too short.\nOverall score: 7", ("Too short.", 7.0)),
    ("**Critique:** Clear.\n\nSecond paragraph.\n\n**Overall score:** 8.5", ("Clear.\n\nSecond paragraph.", 8.5)),
    ("Sure! Critique: fine\nScore: 6/10", ("Sure! Critique: fine", 6.0)),
    ("critique: ok\r\nfinal score: [[9]]\r\nThanks!", ("ok", 9.0)),
    ("The reply is vague. [[3]]", ("The reply is vague.", 3.0)),
    ("Overall score: 10\nCritique: after the score", ("after the score", 10.0)),
    ("Critique: none\nOverall score: 0", None),
    ("Critique: none\nOverall score: 11", None),
    ("Critique: none\nScore: 4/5", None),
    ("Critique: no score here", None),
])
def test_messy_critiques(reply, expected):
    assert parse_critique(reply) == expected


def test_critique_round_trip_and_refusals():
    for critique, score in [("Be shorter.\n\nAnd kinder.", 4), ("", 1), ("Fine.", 9.5)]:
        assert parse_critique(format_critique(critique, score)) == (critique, float(score))
    assert format_critique("Be shorter.", 4) == "Critique: Be shorter.\nOverall score: 4"
    with pytest.raises(ValueError, match="outside 1-10"):
        format_critique("x", 0)
    with pytest.raises(ValueError, match="would not read back"):
        format_critique(" padded ", 5)
