"""``stage=rate``: the judge sees the completions shuffled; ratings land back on their own completions;
unreadable replies are asked again, then counted as unrated."""

from __future__ import annotations

import re

from zephyr_lit.distill import rubrics
from zephyr_lit.distill.rate import RateSettings, run_rate, shuffled_order, unshuffle
from zephyr_lit.distill.store import StageStore
from zephyr_lit.generation import Reply

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Rate me"}]


def row(responses: list[str], question: str = "Rate me") -> dict:
    return {"messages": [PROMPT[0], {"role": "user", "content": question}],
            "completions": [{"model": f"m{i}", "response": r} for i, r in enumerate(responses)]}


class ContentJudge:
    """Rates a text "worth N" with N on every aspect; records the texts in the order it was shown them.
    ``garbage``: aspect -> how many of its replies are unreadable before good ones."""

    name = "content"

    def __init__(self, garbage: dict[str, int] | None = None) -> None:
        self.shown: list[tuple[str, list[str]]] = []
        self.garbage = dict(garbage or {})

    def generate(self, requests):
        replies = []
        for request in requests:
            if rubrics.is_critique_request(list(request.messages)):
                _, text = rubrics.read_critique_request(list(request.messages))
                score = 2 * int(re.search(r"worth (\d)", text).group(1))
                replies.append(Reply(rubrics.format_critique(f"It is worth {score}.", score)))
                continue
            aspect, _, texts = rubrics.read_rating_request(list(request.messages))
            self.shown.append((aspect, texts))
            if self.garbage.get(aspect, 0) > 0:
                self.garbage[aspect] -= 1
                replies.append(Reply("I would rather not say."))
                continue
            ratings = [rubrics.AspectRating(re.search(r"worth (\d)", t).group(1), "as it says",
                                            ("0",) if aspect in rubrics.TYPED_ASPECTS else None,
                                            "as it says" if aspect in rubrics.TYPED_ASPECTS else None) for t in texts]
            replies.append(Reply(rubrics.format_verdict(aspect, ratings)))
        return replies


def test_unshuffle_inverts_the_shown_order():
    """Position j shows completion order[j]: with order [2, 0, 1] the judge's ratings [a, b, c] belong to
    completions 2, 0, 1, i.e. [b, c, a] in the completions' own order."""
    assert unshuffle(["a", "b", "c"], [2, 0, 1]) == ["b", "c", "a"]
    orders = {tuple(shuffled_order(42, f"k{i}", "honesty", 4)) for i in range(20)}
    assert len(orders) > 5 and all(sorted(o) == [0, 1, 2, 3] for o in orders)


def test_ratings_land_on_their_own_completions_after_the_shuffle(tmp_path):
    responses = ["worth 1", "worth 4", "worth 2", "worth 5"]
    judge = ContentJudge()
    store = StageStore(tmp_path, "rate", {})
    store.open()
    output = run_rate([row(responses)], judge, RateSettings(critique=True), seed=3, store=store)
    shown_orders = {tuple(texts) for _, texts in judge.shown}
    assert any(list(o) != responses for o in shown_orders)  # the judge did not see them in order
    completions = output.splits["train"][0]["completions"]
    for completion, expected in zip(completions, ["1", "4", "2", "5"]):
        assert {a["Rating"] for a in completion["annotations"].values()} == {expected}
        assert completion["fine-grained_score"] == float(expected)
        assert completion["overall_score"] == 2 * int(expected)
    assert set(completions[0]["annotations"]["helpfulness"]) == {"Type", "Rationale", "Rating", "Rationale For Rating"}
    assert set(completions[0]["annotations"]["honesty"]) == {"Rating", "Rationale"}


def test_an_unreadable_reply_is_asked_again_then_left_unrated_and_counted(tmp_path):
    judge = ContentJudge(garbage={"honesty": 1, "truthfulness": 99})
    store = StageStore(tmp_path, "rate", {})
    store.open()
    output = run_rate([row(["worth 3", "worth 5"])], judge, RateSettings(retries=2), seed=0, store=store)
    assert [a for a, _ in judge.shown].count("honesty") == 2  # one unreadable reply, then a good one
    assert [a for a, _ in judge.shown].count("truthfulness") == 3  # 1 + judge.retries, all unreadable
    assert output.counts["unrated"] == 1 and output.counts["parse_retries"] == 3
    annotations = output.splits["train"][0]["completions"][1]["annotations"]
    assert set(annotations) == {"instruction_following", "honesty", "helpfulness"}
    assert output.splits["train"][0]["completions"][1]["fine-grained_score"] == 5.0
