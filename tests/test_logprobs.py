"""Per-token and per-sequence log-probs, and the logged mean logit, against hand calculations.

Hand-built example, one row, T = 4, V = 3, labels ``[-100, 2, 0, -100]``. Position ``t`` predicts
token ``t + 1``, so after the shift the targets are ``[2, 0, -100]`` for positions 0, 1, 2:

    t = 0: logits [1.0, 2.0, 0.0] predicts 2:
           logsumexp = log(e^1 + e^2 + e^0) = log(2.718282 + 7.389056 + 1) = log(11.107338) = 2.407606
           logp = 0.0 - 2.407606 = -2.407606
    t = 1: logits [0.5, 0.5, 3.0] predicts 0:
           logsumexp = log(2 e^0.5 + e^3) = log(3.297443 + 20.085537) = log(23.382979) = 3.152008
           logp = 0.5 - 3.152008 = -2.652008
    t = 2: logits [9.0, 9.0, 9.0] predicts -100: masked, logp 0
    t = 3: logits [-4.0, 4.0, 8.0] predicts nothing (dropped by the shift)

    sum  = -2.407606 - 2.652008 = -5.059614;  mean = -5.059614 / 2 = -2.529807
    mean logit over labelled positions 0, 1 and the vocabulary = (3.0 + 4.0) / (2 * 3) = 1.166667
"""

from __future__ import annotations

import math

import pytest
import torch

from zephyr_lit.logprobs import masked_logit_mean, sequence_logprobs, token_logprobs

ROW = [[1.0, 2.0, 0.0], [0.5, 0.5, 3.0], [9.0, 9.0, 9.0], [-4.0, 4.0, 8.0]]
LABELS = [-100, 2, 0, -100]


def logsumexp(xs: list[float]) -> float:
    return math.log(sum(math.exp(x) for x in xs))


LP0 = ROW[0][2] - logsumexp(ROW[0])
LP1 = ROW[1][0] - logsumexp(ROW[1])


def example(masked_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 4, 3) logits and (1, 4) labels; with ``masked_row`` a second, fully masked row."""
    logits, labels = [ROW], [LABELS]
    if masked_row:
        logits.append([[5.0, -5.0, 1.0]] * 4)
        labels.append([-100] * 4)
    return torch.tensor(logits), torch.tensor(labels)


def test_hand_values_are_what_the_docstring_says():
    assert (LP0, LP1) == pytest.approx((-2.407606, -2.652008), abs=1e-6)


def test_token_logprobs_by_hand():
    logits, labels = example()
    logp, mask = token_logprobs(logits, labels)
    assert logp.shape == mask.shape == (1, 3)
    assert mask.tolist() == [[True, True, False]]
    assert logp.dtype == torch.float32
    assert logp[0].tolist() == pytest.approx([LP0, LP1, 0.0], rel=1e-6)


def test_sequence_logprobs_sum_and_mean_by_hand():
    logits, labels = example(masked_row=True)
    total = sequence_logprobs(logits, labels)
    mean = sequence_logprobs(logits, labels, average=True)
    assert total.shape == mean.shape == (2,)
    # row 1 is fully masked: 0, not NaN, for both the sum and the mean
    assert total.tolist() == pytest.approx([LP0 + LP1, 0.0], rel=1e-6)
    assert mean.tolist() == pytest.approx([(LP0 + LP1) / 2, 0.0], rel=1e-6)
    assert total[0].item() == pytest.approx(-5.059614, abs=1e-5)
    assert not torch.isnan(mean).any()


def test_masked_logit_mean_by_hand():
    logits, labels = example(masked_row=True)
    # the masked row and position 2 (all 9s) are excluded: (1 + 2 + 0 + 0.5 + 0.5 + 3) / (2 * 3)
    expected = (sum(ROW[0]) + sum(ROW[1])) / (2 * 3)
    assert expected == pytest.approx(7.0 / 6.0)
    assert masked_logit_mean(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    # nothing labelled at all: 0, not NaN
    assert masked_logit_mean(logits, torch.full_like(labels, -100)).item() == 0.0


def test_fp32_output_for_bf16_logits():
    logits, labels = example(masked_row=True)
    low = logits.to(torch.bfloat16)  # these particular values are exact in bf16
    logp, _ = token_logprobs(low, labels)
    assert logp.dtype == torch.float32
    assert sequence_logprobs(low, labels).dtype == torch.float32
    assert sequence_logprobs(low, labels, average=True).dtype == torch.float32
    assert masked_logit_mean(low, labels).dtype == torch.float32
    torch.testing.assert_close(logp, token_logprobs(logits, labels)[0])


def random_batch(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 7, 11, generator=g)).to(dtype)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, 5:] = -100  # padding
    return logits, labels


def reference_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != -100
    full = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    picked = full.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return torch.where(mask, picked, torch.zeros_like(picked)), mask


def test_token_logprobs_agree_with_log_softmax():
    logits, labels = random_batch()
    logp, mask = token_logprobs(logits, labels)
    ref_logp, ref_mask = reference_token_logprobs(logits, labels)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(sequence_logprobs(logits, labels), ref_logp.sum(-1))
    torch.testing.assert_close(
        sequence_logprobs(logits, labels, average=True), ref_logp.sum(-1) / ref_mask.sum(-1)
    )


def test_token_logprobs_gradients_agree_with_log_softmax():
    logits, labels = random_batch()
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    sequence_logprobs(a, labels).sum().backward()
    reference_token_logprobs(b, labels)[0].sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert a.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_bf16_random_agrees_with_fp32_of_the_same_values():
    logits, labels = random_batch(torch.bfloat16)
    logp, _ = token_logprobs(logits, labels)
    ref_logp, _ = reference_token_logprobs(logits.float(), labels)
    torch.testing.assert_close(logp, ref_logp)


def _tiny_model_and_batch():
    from transformers import AutoConfig, AutoModelForCausalLM

    from zephyr_lit.assets import asset_path

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(asset_path("tiny-mistral")))
    input_ids = torch.randint(3, 1000, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 9:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :5] = -100  # prompt
    labels[2, 9:] = -100  # padding
    labels[1, :] = -100  # a row with nothing to score
    return model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("chunk_tokens", [1, 4, 2048])
def test_head_at_labelled_positions_equals_the_full_logits_path(chunk_tokens):
    """Same per-row log-probs, logit means and gradients as full logits + token_logprobs, chunked or not."""
    from zephyr_lit.logprobs import completion_scores, split_head

    model, batch = _tiny_model_and_batch()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = sequence_logprobs(logits, batch["labels"])
    expected.sum().backward()
    expected_grad = model.lm_head.weight.grad.clone(), model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()

    body, head = split_head(model)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    scores = completion_scores(hidden, head, batch["labels"], chunk_tokens=chunk_tokens)
    torch.testing.assert_close(scores.logps(), expected, rtol=1e-5, atol=1e-5)
    assert scores.token_count.tolist() == [7, 0, 4]  # targets 5..11, none, 5..8
    torch.testing.assert_close(scores.logps(average=True), sequence_logprobs(logits, batch["labels"], average=True),
                               rtol=1e-5, atol=1e-5)
    for rows in (slice(0, 1), slice(1, 3), slice(0, 3)):
        torch.testing.assert_close(scores.logit_mean(rows), masked_logit_mean(logits[rows].detach(), batch["labels"][rows]),
                                   rtol=1e-5, atol=1e-6)
    assert scores.mean_nll(slice(0, 3)).item() == pytest.approx(-expected.sum().item() / 11, rel=1e-5)
    scores.logps().sum().backward()
    torch.testing.assert_close(model.lm_head.weight.grad, expected_grad[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight.grad, expected_grad[1], rtol=1e-4, atol=1e-6)


# ---- rows of similar length in separate passes ------------------------------------------------
@pytest.mark.parametrize(
    ("lengths", "max_groups", "expected"),
    [
        # [8, 2, 8, 2]: one pass 4 x 8 = 32 positions; {0, 2} x 8 + {1, 3} x 2 = 20, and 20 x 1.03 < 32
        ([8, 2, 8, 2], 4, [[0, 2], [1, 3]]),
        # [10, 9, 3, 2] in at most 2: {0, 1} x 10 + {2, 3} x 3 = 26 (one pass: 40; {0} + {1, 2, 3} x 9: 37)
        ([10, 9, 3, 2], 2, [[0, 1], [2, 3]]),
        # [10, 10, 10, 9]: one pass 40; the best split 30 + 9 = 39, but 39 x 1.03 = 40.17 > 40
        ([10, 10, 10, 9], 4, [[0, 1, 2, 3]]),
        ([10, 2], 1, [[0, 1]]),  # max_groups 1: always one pass
        ([7], 4, [[0]]),
    ],
)
def test_length_groups_cut_sorted_rows_where_it_saves_padding(lengths, max_groups, expected):
    from zephyr_lit.logprobs import length_groups

    assert length_groups(lengths, max_groups) == expected


def test_right_padded_lengths_refuses_left_padding():
    from zephyr_lit.logprobs import right_padded_lengths

    assert right_padded_lengths(torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])) == [3, 4, 1]
    assert right_padded_lengths(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])) is None


def test_length_grouped_passes_equal_one_padded_pass_and_skip_the_padding():
    """Rows of lengths 12, 4, 12, 4 run as two passes of widths 12 and 4 (24 + 8 positions instead
    of 48; a third pass would save nothing; the padding is never computed) and give the same log-probs, token counts, logit sums and gradients as one pass."""
    from zephyr_lit.logprobs import model_completion_scores

    torch.manual_seed(0)
    model, _ = _tiny_model_and_batch()
    input_ids = torch.randint(3, 1000, (4, 12))
    lengths = [12, 4, 12, 4]
    attention_mask = (torch.arange(12).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :2] = -100
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    one = model_completion_scores(model, batch, max_groups=1)
    one.logps().sum().backward()
    expected_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()

    widths = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape),
                                                 with_kwargs=True)
    grouped = model_completion_scores(model, batch, max_groups=4)
    hook.remove()
    assert widths == [torch.Size([2, 12]), torch.Size([2, 4])]  # rows {0, 2} then {1, 3}
    assert grouped.token_count.tolist() == [10, 2, 10, 2] == one.token_count.tolist()  # targets 2..L-1
    torch.testing.assert_close(grouped.logps(), one.logps(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped.logit_sum, one.logit_sum, rtol=1e-5, atol=1e-4)
    grouped.logps().sum().backward()
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight.grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_packed_rows_always_run_as_one_pass():
    from zephyr_lit.logprobs import model_completion_scores

    model, _ = _tiny_model_and_batch()
    input_ids = torch.randint(3, 1000, (2, 8))
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 0, 1, 2, 3]])
    widths = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape),
                                                 with_kwargs=True)
    model_completion_scores(model, {"input_ids": input_ids, "position_ids": position_ids, "labels": input_ids},
                            max_groups=4)
    hook.remove()
    assert widths == [torch.Size([2, 8])]


def test_length_groups_below_one_is_a_config_error():
    from tests.conftest import compose_config
    from zephyr_lit.config import config_problems

    problems = config_problems(compose_config(["module.length_groups=0"]))
    assert any(p.startswith("module.length_groups=0: must be >= 1") for p in problems)
