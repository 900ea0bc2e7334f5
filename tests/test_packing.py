"""Packing keeps examples apart: positions restart, no label crosses a boundary, and the model's
logits for a packed row equal those of each example run alone."""

import torch
from transformers import MistralConfig, MistralForCausalLM

from zephyr_lit.data.collate import pad_batch
from zephyr_lit.data.tokenize import pack_sequences

IGN = -100


def test_pack_sequences_by_hand():
    ids = [[1, 10, 11], [1, 20], [1, 30, 31, 32], [1, 40]]
    labels = [[IGN, 10, 11], [IGN, 20], [IGN, IGN, 31, 32], [IGN, 40]]
    rows = pack_sequences(ids, labels, max_length=6)
    # 3 + 2 fit in 6; adding 4 would make 9 -> new row; 4 + 2 = 6 fits.
    assert rows["input_ids"] == [[1, 10, 11, 1, 20], [1, 30, 31, 32, 1, 40]]
    assert rows["labels"] == [[IGN, 10, 11, IGN, 20], [IGN, IGN, 31, 32, IGN, 40]]
    assert rows["position_ids"] == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0, 1]]


def test_pad_batch_unpacked_and_packed_by_hand():
    rows = [{"input_ids": [1, 5, 6], "labels": [IGN, 5, 6]}, {"input_ids": [1, 7], "labels": [IGN, 7]}]
    batch = pad_batch(rows, pad_id=2, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 2, 2]]
    assert batch["labels"].tolist() == [[IGN, 5, 6, IGN], [IGN, 7, IGN, IGN]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch["num_tokens"].item() == 5

    packed = [{"input_ids": [1, 5, 1, 7, 8], "labels": [IGN, 5, IGN, 7, 8], "position_ids": [0, 1, 0, 1, 2]}]
    batch = pad_batch(packed, pad_id=2, pad_to_multiple_of=8)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2]]  # padding is its own segment
    assert batch["labels"].tolist() == [[IGN, 5, IGN, 7, 8, IGN, IGN, IGN]]


def test_packed_row_logits_equal_separate_examples():
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = MistralForCausalLM(config).eval()
    a, b = [1, 5, 9, 13, 17], [1, 21, 25]
    packed = pad_batch(
        [{"input_ids": a + b, "labels": a + b, "position_ids": list(range(5)) + list(range(3))}],
        pad_id=2, pad_to_multiple_of=None,
    )
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        alone_a = model(input_ids=torch.tensor([a])).logits[0]
        alone_b = model(input_ids=torch.tensor([b])).logits[0]
        # without restarting positions the second example would see the first: the test can fail
        leaky = model(input_ids=packed["input_ids"], use_cache=False).logits[0]
    torch.testing.assert_close(logits[:5], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[5:], alone_b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(leaky[5:], alone_b, atol=1e-3)
