"""The Zephyr format and the assistant-only label mask, on exact tokens of the shipped tokenizer."""

import pytest

from zephyr_lit.assets import SFT_DATA, TINY_MODEL, asset_path
from zephyr_lit.chat import ZEPHYR_CHAT_TEMPLATE, render
from zephyr_lit.data.load import load_split
from zephyr_lit.data.tokenize import IGNORE_INDEX, tokenize_conversation
from zephyr_lit.models import ModelSpec, load_tokenizer

IGN = IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSpec(name_or_path=asset_path(TINY_MODEL)))


def test_render_by_hand():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    rendered = render(messages, "</s>")
    assert rendered.text == "<|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n"
    (start, end), = rendered.assistant_spans
    assert rendered.text[start:end] == "Hello!</s>"
    prompt = render(messages[:1], "</s>", add_generation_prompt=True).text
    assert prompt == "<|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\n"


def test_template_equals_render_on_the_embedded_data(tokenizer):
    assert tokenizer.chat_template == ZEPHYR_CHAT_TEMPLATE
    rows = load_split(asset_path(SFT_DATA), "test_sft").dataset["messages"]
    for messages in rows[:50]:
        assert tokenizer.apply_chat_template(messages, tokenize=False) == render(messages, "</s>").text
        assert tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True) == render(
            messages[:-1], "</s>", add_generation_prompt=True
        ).text


def test_assistant_only_labels_by_hand(tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}]
    tokens = tokenize_conversation(messages, tokenizer, max_length=256)
    pieces = tokenizer.convert_ids_to_tokens(tokens.input_ids)
    assert pieces == [
        "<s>", "▁<|system|>", "\n", "</s>", "\n",
        "<|user|>", "\n", "What", "▁is", "▁2", "▁+", "▁3?", "</s>", "\n",
        "<|assistant|>", "\n", "2", "▁+", "▁3", "▁=", "▁5.", "</s>", "\n",
    ]
    assert tokens.input_ids[:4] == [1, 388, 259, 2]  # BOS once (id 1), then the empty system turn
    # Trained: the reply and its closing </s> (id 2, the same id as pad); nothing else.
    trained = [p for p, label in zip(pieces, tokens.labels) if label != IGN]
    assert trained == ["2", "▁+", "▁3", "▁=", "▁5.", "</s>"]
    assert tokens.labels[-2] == tokenizer.eos_token_id == tokenizer.pad_token_id == 2
    assert [label != IGN for label in tokens.labels] == [False] * 16 + [True] * 6 + [False]
    assert all(label == token for label, token in zip(tokens.labels, tokens.input_ids) if label != IGN)


def test_every_assistant_turn_is_labelled_and_full_sequence_mode(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"},
    ]
    tokens = tokenize_conversation(messages, tokenizer, max_length=256)
    trained_text = tokenizer.decode([t for t, label in zip(tokens.input_ids, tokens.labels) if label != IGN])
    assert trained_text == "Hello!</s>Goodbye!</s>"  # both replies, each with its closing </s>
    everything = tokenize_conversation(messages, tokenizer, max_length=256, assistant_only_loss=False)
    assert everything.labels == [IGN] + everything.input_ids[1:]  # all but BOS, which nothing predicts


def test_truncation_keeps_the_start(tokenizer):
    messages = [{"role": "user", "content": "count " * 100}, {"role": "assistant", "content": "ok"}]
    full = tokenize_conversation(messages, tokenizer, max_length=10_000)
    cut = tokenize_conversation(messages, tokenizer, max_length=32)
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:32] and all(label == IGN for label in cut.labels)
