"""The one generation path: seeded per-request sampling, left padding, the model's own chat template."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from zephyr_lit.assets import asset_path
from zephyr_lit.distill.backends import HFBackend
from zephyr_lit.evaluation import greedy_replies
from zephyr_lit.generation import (
    ChatRequest, Reply, Sampling, SeededSampler, decode_reply, generate_with_model, nucleus, request_seed,
)
from zephyr_lit.models import ModelSpec, load_tokenizer

OWN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def tiny_model():
    config = AutoConfig.from_pretrained(asset_path("tiny-mistral"))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def zephyr_tokenizer():
    return load_tokenizer(ModelSpec(name_or_path=asset_path("tiny-mistral")))


def conversations() -> list[list[dict]]:
    return [
        [{"role": "user", "content": "What is 2 + 3?"}],
        [{"role": "system", "content": "Talk like a pirate."}, {"role": "user", "content": "Capital of France, please?"}],
        [{"role": "user", "content": "Hi"}],
    ]


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    """Probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps 0.5 and 0.3 (0.5 < 0.7 <= 0.8); top_p=0.5 keeps
    only the first; the others go to -inf and the kept logits are unchanged."""
    logits = torch.log(torch.tensor([0.15, 0.5, 0.05, 0.3]))
    kept = nucleus(logits, 0.7)
    assert torch.isinf(kept[[0, 2]]).all() and torch.equal(kept[[1, 3]], logits[[1, 3]])
    assert torch.isfinite(nucleus(logits, 0.5)).tolist() == [False, True, False, False]


def test_seeded_sampler_draws_from_the_tempered_softmax():
    """Gumbel-max over logits/T: with T=0.5 the frequencies follow softmax(2 * logits)."""
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    expected = torch.softmax(logits[0] / 0.5, dim=-1)  # 0.78, 0.20, 0.02
    draws = []
    for seed in range(2000):
        sampler = SeededSampler([Sampling(temperature=0.5)], [seed], torch.device("cpu"))
        draws.append(int(sampler(torch.zeros(1, 1, dtype=torch.long), logits.clone()).argmax()))
    frequencies = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    assert torch.allclose(frequencies, expected, atol=0.03)


def test_greedy_rows_are_untouched_by_the_sampler():
    scores = torch.randn(2, 7)
    out = SeededSampler([Sampling(temperature=0.0), Sampling(temperature=1.0)], [1, 2], torch.device("cpu"))(
        torch.zeros(2, 1, dtype=torch.long), scores.clone())
    assert torch.equal(out[0], scores[0]) and not torch.equal(out[1], scores[1])


def test_a_sampled_reply_depends_on_its_seed_not_on_its_batch(tiny_model, zephyr_tokenizer):
    sampling = Sampling(temperature=1.0, max_new_tokens=12)
    requests = [ChatRequest(c, sampling, request_seed(7, i)) for i, c in enumerate(conversations())]
    together = generate_with_model(tiny_model, zephyr_tokenizer, requests, batch_size=3)
    alone = [generate_with_model(tiny_model, zephyr_tokenizer, [r], batch_size=1)[0] for r in requests]
    reversed_batch = generate_with_model(tiny_model, zephyr_tokenizer, requests[::-1], batch_size=3)[::-1]
    assert together == alone == reversed_batch
    other_seed = generate_with_model(tiny_model, zephyr_tokenizer, [ChatRequest(requests[0].messages, sampling, 99)])
    assert other_seed[0].text != together[0].text  # a random-init model's 12 sampled tokens differ by seed


def test_greedy_replies_equal_step_by_step_argmax(tiny_model, zephyr_tokenizer):
    """val/exact_match's path: the reply is the argmax continuation, computed here one token at a time
    without padding or generate()."""
    replies = greedy_replies(tiny_model, zephyr_tokenizer, conversations(), max_new_tokens=6, batch_size=2)
    for conversation, reply in zip(conversations(), replies):
        text = zephyr_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        ids = zephyr_tokenizer(text, return_tensors="pt")["input_ids"]  # BOS added once (template has none)
        assert ids[0, 0] == zephyr_tokenizer.bos_token_id and (ids[0] == zephyr_tokenizer.bos_token_id).sum() == 1
        new = []
        for _ in range(6):
            with torch.no_grad():
                next_id = int(tiny_model(ids).logits[0, -1].argmax())
            if next_id == zephyr_tokenizer.eos_token_id:
                break
            new.append(next_id)
            ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
        assert reply == zephyr_tokenizer.decode(new, skip_special_tokens=True)


def test_replies_stop_at_an_end_token_or_report_the_cut(zephyr_tokenizer):
    eos = zephyr_tokenizer.eos_token_id
    ids = zephyr_tokenizer("ahoy there", add_special_tokens=False)["input_ids"]
    assert decode_reply(zephyr_tokenizer, ids + [eos, 5, 6], [eos], 50) == Reply("ahoy there", "stop")
    assert decode_reply(zephyr_tokenizer, ids, [eos], 50).finish_reason == "length"
    assert decode_reply(zephyr_tokenizer, ids + [eos], [eos], len(ids)).finish_reason == "length"


def test_request_seeds_are_stable_and_distinct():
    assert request_seed(42, "abc", 0) == request_seed(42, "abc", 0)
    assert len({request_seed(42, "abc", i) for i in range(100)}) == 100
    assert 0 <= request_seed("x") < 2**63


def test_hf_backend_uses_the_models_own_chat_template(tmp_path, tiny_model):
    """A teacher keeps its template: the prompt the backend builds is the folder's template, not Zephyr's,
    with BOS once (the template writes it, so the tokenizer does not add another)."""
    folder = tmp_path / "teacher"
    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny-mistral"))
    tokenizer.chat_template = OWN_TEMPLATE
    tokenizer.save_pretrained(folder)
    tiny_model.save_pretrained(folder)
    backend = HFBackend(str(folder), device="cpu", batch_size=2)
    replies = backend.generate([ChatRequest(c, Sampling(max_new_tokens=5)) for c in conversations()])
    assert backend.name == "teacher" and len(replies) == 3 and all(r.finish_reason in ("stop", "length") for r in replies)
    rendered = backend.tokenizer.apply_chat_template(conversations()[1], tokenize=False, add_generation_prompt=True)
    assert rendered == "<s>[system] Talk like a pirate.\n[user] Capital of France, please?\n[assistant] "
    assert "<|assistant|>" not in rendered
    # same replies as the path val/exact_match uses, given the same tokenizer: one path
    expected = generate_with_model(tiny_model, backend.tokenizer, [ChatRequest(conversations()[1], Sampling(max_new_tokens=5))])
    assert replies[1] == expected[0]
    ids = backend.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(backend.tokenizer.bos_token_id) == 1
    assert not math.isnan(float(len(ids)))
