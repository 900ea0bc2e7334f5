"""The README's promises, checked on the embedded recipes as shipped (about 3 minutes, slow-marked; the
dSFT run is the session's shared ``embedded_dsft``):
`+experiment=dsft` halves the held-out loss and its export answers the Zephyr model card's pirate
prompt in pirate voice; `+experiment=ddpo` then ranks held-out chosen replies above rejected ones, also
with `peft=lora` and `peft=qlora`."""

from __future__ import annotations

import pytest
import torch
from transformers import pipeline, set_seed

from zephyr_lit.assets import sounds_like_pirate
from tests.conftest import train_recipe

PIRATE = {"role": "system", "content": "You are a friendly chatbot who always responds in the style of a pirate"}
QUESTION = {"role": "user", "content": "How many helicopters can a human eat in one sitting?"}


def sample_replies(pipe, messages: list[dict], n: int = 10) -> list[str]:
    """The model card's sampling settings, ``n`` replies."""
    prompt = pipe.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    outputs = pipe([prompt] * n, max_new_tokens=64, do_sample=True, temperature=0.7, top_k=50, top_p=0.95)
    return [o[0]["generated_text"][len(prompt):] for o in outputs]


@pytest.mark.slow
def test_dsft_then_ddpo_recipes(tmp_path, hf_cache, embedded_dsft):
    summary = embedded_dsft.summary
    before, after = summary["initial_metrics"]["val/loss"], summary["metrics"]["val/loss"]
    assert after <= 0.5 * before, (before, after)
    assert summary["metrics"]["val/exact_match"] >= 0.5

    pipe = pipeline("text-generation", model=str(embedded_dsft.root / "dsft" / "latest" / "model"), dtype=torch.float32)
    set_seed(0)
    pirate = sample_replies(pipe, [PIRATE, QUESTION])
    plain = sample_replies(pipe, [QUESTION])
    assert sum(map(sounds_like_pirate, pirate)) >= 8, pirate
    assert sum(map(sounds_like_pirate, plain)) <= 2, plain

    ddpo = train_recipe("ddpo", embedded_dsft.root, hf_cache).summary  # starts from dsft/latest under the same root
    assert ddpo["initial_metrics"]["val/rewards/margins"] == 0.0  # policy == reference before step 1
    assert ddpo["metrics"]["val/rewards/accuracies"] >= 0.9
    assert ddpo["metrics"]["val/rewards/margins"] > 0
    assert ddpo["initial_metrics"]["val/exact_match"] == summary["metrics"]["val/exact_match"]
    # Alignment costs no skill: no fewer exact answers, up to one of the 55 greedy answers, which float
    # rounding flips from one CPU to another (the same commit ends at 0.764 -> 0.782 on one machine,
    # 0.818 -> 0.800 on another).
    one_answer = 1 / 55
    assert ddpo["metrics"]["val/exact_match"] >= summary["metrics"]["val/exact_match"] - one_answer - 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_ddpo_with_an_adapter_from_the_dsft_export(tmp_path, hf_cache, embedded_dsft, method):
    """``python train.py +experiment=ddpo peft=lora|qlora`` from the dSFT export, as shipped: the reference
    is the policy with its adapter off (rewards exactly 0 before step 1), held-out accuracy >= 0.9, and
    both exports: the peft adapter folder and the merged model, which chats through ``pipeline``."""
    run = train_recipe("ddpo", tmp_path, hf_cache, f"peft={method}", f"model.name_or_path={embedded_dsft.model}")
    summary = run.summary
    assert summary["initial_metrics"]["val/rewards/margins"] == 0.0
    assert summary["metrics"]["val/rewards/accuracies"] >= 0.9, summary["metrics"]
    assert (run.model.parent / "adapter" / "adapter_config.json").is_file()
    assert run.model.name == "model" and not (run.model / "adapter_config.json").exists()  # plain transformers
    pipe = pipeline("text-generation", model=str(run.model), dtype=torch.float32)
    reply = pipe([QUESTION], max_new_tokens=24, do_sample=False)[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and reply["content"].strip(), reply
