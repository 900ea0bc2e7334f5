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
