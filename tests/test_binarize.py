"""``stage=binarize``'s pure logic on hand-made UltraFeedback rows, expected pairs worked out by hand.

A completion's ``mean`` score is the mean of its numeric aspect Ratings; the helpers below give every
aspect the same Rating unless told otherwise, so ``c("a", 5)`` scores 5.0.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from zephyr_lit.distill.binarize import (
    COUNTS,
    SPLITS,
    BinarizeOptions,
    binarize,
    binarize_problems,
    completion_score,
)
from zephyr_lit.errors import ConfigError, DataError

KEEP, DROP = BinarizeOptions(test_size=0), BinarizeOptions(ties="drop", test_size=0)


def c(response: str, *ratings: str | int, overall: float | None = None) -> dict:
    """A completion in the openbmb/UltraFeedback schema; one rating is used for all four aspects."""
    r = [str(x) for x in ratings] * (4 if len(ratings) == 1 else 1)
    return {
        "model": "m", "principle": "helpfulness", "custom_system_prompt": "", "response": response,
        "annotations": {
            "instruction_following": {"Rating": r[0], "Rationale": "."},
            "honesty": {"Rating": r[1], "Rationale": "."},
            "truthfulness": {"Type": ["0"], "Rationale": ".", "Rating": r[2], "Rationale For Rating": "."},
            "helpfulness": {"Type": ["1"], "Rationale": ".", "Rating": r[3], "Rationale For Rating": "."},
        },
        "fine-grained_score": None, "overall_score": overall, "critique": "",
    }


def row(instruction: str, *completions: dict, messages: list[dict] | None = None) -> dict:
    out = {"source": "hand", "instruction": instruction, "models": ["m"] * len(completions),
           "completions": list(completions)}
    if messages is not None:
        out |= {"messages": messages, "prompt_id": hashlib.sha256(instruction.encode()).hexdigest()}
    return out


def pair(b, split: str = "train_prefs", i: int = 0) -> tuple[str, str, float, float]:
    r = b.splits[split][i]
    return r["chosen"][-1]["content"], r["rejected"][-1]["content"], r["score_chosen"], r["score_rejected"]


def test_mean_score_leaves_na_ratings_out():
    """Ratings 5, 4, N/A, 3 -> (5 + 4 + 3) / 3 = 4.0, not (5 + 4 + 0 + 3) / 4 = 3.0."""
    assert completion_score(c("x", 5, 4, "N/A", 3), "mean") == 4.0
    assert completion_score(c("x", "N/A"), "mean") is None
    assert completion_score({**c("x", 5), "annotations": {}}, "mean") is None
    assert completion_score(c("x", 1, overall=7.5), "overall") == 7.5
    assert completion_score(c("x", 5), "overall") is None


def test_two_completions_rejected_is_the_other_one():
    """Scores 2.0 and 4.5 (ratings 4,5,4,5): chosen 'good' at 4.5, rejected 'bad' at 2.0, any seed."""
    rows = [row("q", c("bad", 2), c("good", 4, 5, 4, 5))]
    for seed in range(5):
        assert pair(binarize(rows, KEEP, seed)) == ("good", "bad", 4.5, 2.0)


def test_one_rated_completion_is_skipped_and_counted():
    """'b' is all N/A and 'c' is blank: one rated completion is left, so no pair."""
    b = binarize([row("q", c("a", 5), c("b", "N/A"), c("  ", 5)), row("q2", c("x", 1), c("y", 2))], KEEP, 0)
    assert b.counts["skipped_unrated"] == 1 and b.counts["pairs"] == 1
    assert b.counts["unrated_completions"] == 1 and b.counts["empty_responses"] == 1


def test_ties_for_best_keep_and_drop():
    """Scores a=5, b=5, z=3. Chosen is a or b (the seeded draw; both occur over seeds). keep: rejected is
    any other, so the tied 5 can be it; drop: only z (strictly lower) can be rejected."""
    rows = [row("q", c("a", 5), c("b", 5), c("z", 3))]
    kept = {pair(binarize(rows, KEEP, s))[:2] for s in range(40)}
    assert {ch for ch, _ in kept} == {"a", "b"} and ("a", "b") in kept and ("b", "a") in kept
    dropped = {pair(binarize(rows, DROP, s)) for s in range(40)}
    assert dropped == {("a", "z", 5.0, 3.0), ("b", "z", 5.0, 3.0)}


def test_all_tied_dropped_with_drop_kept_with_keep():
    """Scores 4, 4, 4: drop finds nothing strictly lower -> dropped_ties=1; keep pairs two at 4.0 each."""
    rows = [row("q", c("a", 4), c("b", 4), c("c", 4))]
    b = binarize(rows, DROP, 0)
    assert b.counts["dropped_ties"] == 1 and b.counts["pairs"] == 0
    b = binarize(rows, KEEP, 0)
    chosen, rejected, sc, sr = pair(b)
    assert chosen != rejected and sc == sr == 4.0 and b.counts["tied_pairs"] == 1


def test_rejected_lowest():
    """Scores a=5, b=2, c=4, d=2: chosen a; lowest is 2, shared by b and d (the draw picks one; both occur)."""
    rows = [row("q", c("a", 5), c("b", 2), c("c", 4), c("d", 2))]
    for ties in ("keep", "drop"):
        options = BinarizeOptions(rejected="lowest", ties=ties, test_size=0)
        got = {pair(binarize(rows, options, s)) for s in range(40)}
        assert got == {("a", "b", 5.0, 2.0), ("a", "d", 5.0, 2.0)}


def test_score_overall_uses_overall_score():
    """mean would choose 'a' (5 > 4 > 1); overall_score says b=9 > c=7 > a=6: chosen b, and with
    rejected=lowest the rejected is a (6), not c (7)."""
    rows = [row("q", c("a", 5, overall=6), c("b", 4, overall=9), c("c", 1, overall=7))]
    options = BinarizeOptions(score="overall", rejected="lowest", test_size=0)
    assert pair(binarize(rows, options, 0)) == ("b", "a", 9.0, 6.0)


def test_score_overall_some_missing_is_fine_none_anywhere_is_a_data_error():
    """Row 0: one overall_score -> skipped_unrated; row 1: two -> a pair. No overall_score in the whole
    input (rows rated without the critique) -> one line naming source, row and field, and the fixes."""
    options = BinarizeOptions(score="overall", test_size=0)
    rows = [row("q0", c("a", 5, overall=8), c("b", 5)), row("q1", c("a", 5, overall=3), c("b", 1, overall=4))]
    b = binarize(rows, options, 0)
    assert b.counts["skipped_unrated"] == 1 and pair(b) == ("b", "a", 4.0, 3.0)
    with pytest.raises(DataError) as error:
        binarize([row("q", c("a", 5), c("b", 4))], options, 0, source="rated.jsonl")
    message = str(error.value)
    assert "\n" not in message and "rated.jsonl row 0" in message and "completions[0].overall_score" in message
    assert "rate.critique=true" in message and "binarize.score=mean" in message


def ten_rows() -> list[dict]:
    """Ten prompts with a system turn; the chosen reply of prompt i is 'good i' (5), rejected 'bad i' (1)."""
    return [row(f"q{i}", c(f"good {i}", 5), c(f"bad {i}", 1),
                messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}"}])
            for i in range(10)]


def test_split_sizes_sft_equals_prefs_and_gen_lacks_the_final_assistant_turn():
    """test_size=3 of 10 -> test 3, train 7; sft = prefs; gen = same rows, messages = the prompt turns."""
    b = binarize(ten_rows(), BinarizeOptions(test_size=3), 0)
    assert set(b.splits) == set(SPLITS) and set(b.counts) == set(COUNTS)
    assert (len(b.splits["test_prefs"]), len(b.splits["train_prefs"])) == (3, 7)
    assert (b.counts["test"], b.counts["train"], b.counts["pairs"]) == (3, 7, 10)
    for part in ("train", "test"):
        prefs = b.splits[f"{part}_prefs"]
        assert b.splits[f"{part}_sft"] == prefs
        for gen, full in zip(b.splits[f"{part}_gen"], prefs, strict=True):
            assert gen["messages"] == full["chosen"][:-1] and gen["messages"][-1]["role"] == "user"
            assert gen | {"messages": None} == full | {"messages": None}
    first = b.splits["train_prefs"][0]
    assert first["prompt"] == first["chosen"][1]["content"]
    assert first["prompt_id"] == hashlib.sha256(first["prompt"].encode("utf-8")).hexdigest()
    assert first["chosen"][:2] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": first["prompt"]}]
    assert first["messages"] == first["chosen"] and first["chosen"][:-1] == first["rejected"][:-1]
    # Within a split, input order: q0 < q1 < ... by their index.
    order = [int(r["prompt"][1:]) for r in b.splits["train_prefs"]]
    assert order == sorted(order)


def test_test_size_zero_and_too_large():
    """test_size=0 -> empty test split; 11 of 10 pairs -> a one-line DataError with both numbers."""
    b = binarize(ten_rows(), BinarizeOptions(test_size=0), 0)
    assert b.splits["test_prefs"] == [] and b.splits["test_gen"] == [] and len(b.splits["train_prefs"]) == 10
    with pytest.raises(DataError, match=r"binarize.test_size=11 but only 10 pairs"):
        binarize(ten_rows(), BinarizeOptions(test_size=11), 0)


def test_hub_rows_prompt_is_the_instruction():
    """No 'messages': the prompt conversation is the one user turn, the instruction."""
    b = binarize([row("What is 2 + 2?", c("4", 5), c("5", 1))], KEEP, 0)
    assert b.splits["train_prefs"][0]["chosen"] == [{"role": "user", "content": "What is 2 + 2?"},
                                                     {"role": "assistant", "content": "4"}]


def test_determinism_order_independence_and_seed():
    """Pairs come from per-row seeded draws: same seed -> same output; reversed rows -> the same pair and
    the same split for each prompt; another seed -> another test set (3 of 10: 120 possible sets)."""
    rows = [row(f"q{i}", *(c(f"r{i}.{j}", 5 - j % 2) for j in range(4))) for i in range(10)]
    options = BinarizeOptions(test_size=3)
    a, again, reverse = binarize(rows, options, 0), binarize(rows, options, 0), binarize(rows[::-1], options, 0)
    assert a == again

    def by_prompt(b):
        return {r["prompt"]: (split, pair(b, split, i)) for split in ("train_prefs", "test_prefs")
                for i, r in enumerate(b.splits[split])}

    assert by_prompt(a) == by_prompt(reverse)
    assert {r["prompt"] for r in binarize(rows, options, 1).splits["test_prefs"]} != {
        r["prompt"] for r in a.splits["test_prefs"]}


def test_random_rejected_is_uniform_over_the_others():
    """Scores 5, 3, 2, 1: chosen is always 'best'; over 300 seeds each of the 3 others is expected 100 times
    (binomial sd = sqrt(300 * 1/3 * 2/3) = 8.2), so 80..120 is about +-2.4 sd."""
    rows = [row("q", c("best", 5), c("x", 3), c("y", 2), c("z", 1))]
    drawn = Counter(pair(binarize(rows, KEEP, s))[1] for s in range(300))
    assert set(drawn) == {"x", "y", "z"} and all(80 <= n <= 120 for n in drawn.values()), drawn


def test_duplicates_keep_the_first_but_a_system_prompt_makes_another_prompt():
    """Rows 0 and 1 share the conversation -> row 1 is a duplicate; row 2 asks the same text under a
    system prompt -> its own prompt (same prompt_id: it hashes the first user text only)."""
    system = [{"role": "system", "content": "Talk like a pirate."}, {"role": "user", "content": "q"}]
    rows = [row("q", c("first", 5), c("w", 1)), row("q", c("second", 5), c("w", 1)),
            row("q", c("pirate", 5), c("w", 1), messages=system)]
    b = binarize(rows, KEEP, 0)
    assert b.counts["duplicates"] == 1 and b.counts["pairs"] == 2
    assert [pair(b, i=i)[0] for i in range(2)] == ["first", "pirate"]
    assert b.splits["train_prefs"][0]["prompt_id"] == b.splits["train_prefs"][1]["prompt_id"]


def test_counts_add_up():
    """rows_in = duplicates + skipped_unrated + dropped_ties + pairs: 5 = 1 + 1 + 1 + 2."""
    rows = [row("a", c("x", 5), c("y", 1)), row("a", c("x", 5), c("y", 1)), row("b", c("x", 5)),
            row("c", c("x", 3), c("y", 3)), row("d", c("x", 2), c("y", 4))]
    n = binarize(rows, DROP, 0).counts
    assert (n["rows_in"], n["duplicates"], n["skipped_unrated"], n["dropped_ties"], n["pairs"]) == (5, 1, 1, 1, 2)


def test_a_prompt_not_ending_with_a_user_turn_is_a_data_error():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(DataError, match=r"in.jsonl row 0: field 'messages' must end with a user turn"):
        binarize([row("q", c("x", 5), c("y", 1), messages=messages)], KEEP, 0, source="in.jsonl")


def test_binarize_problems_one_line_each():
    options = BinarizeOptions(score="median", rejected="worst", ties="maybe", test_size=-1)
    problems = binarize_problems(options)
    assert len(problems) == 4 and all(p.startswith("binarize.") for p in problems)
    assert problems[0] == "binarize.score='median': must be one of mean, overall"
    assert binarize_problems(BinarizeOptions()) == []
    with pytest.raises(ConfigError, match="binarize.ties='maybe'"):
        binarize([], options, 0)
