"""Packing keeps examples apart: positions restart, no label crosses a boundary, and the model's
logits for a packed batch equal those of each example run alone, in the layout the collate makes
for every attention implementation ((B, T) rows, or one flattened (1, N) row for flash attention)."""

import functools

import pytest
import torch
from hydra.utils import instantiate
from transformers import MistralConfig, MistralForCausalLM
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

from tests.conftest import compose_config
from zephyr_lit.data.collate import flatten_packed, pad_batch
from zephyr_lit.data.tokenize import pack_sequences
from zephyr_lit.logprobs import model_completion_scores

IGN = -100

# Five examples packed into rows of at most 9 tokens: [5, 3], [6, 3], [2] -> three rows, right-padded.
EXAMPLES = [[1, 5, 9, 13, 17], [1, 21, 25], [1, 30, 31, 32, 33, 34], [1, 40, 41], [1, 50]]
STARTS = [0, 5, 8, 14, 17]  # where each example starts once the rows' real tokens are concatenated
REAL = 19  # real tokens in all


def packed_rows() -> list[dict]:
    labels = [[IGN] + ids[1:] for ids in EXAMPLES]  # an example's first label is always ignored
    columns = pack_sequences(EXAMPLES, labels, max_length=9)
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


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
    # unpacked rows keep (B, T) and their mask under flash attention too (transformers unpads them)
    flash = pad_batch(rows, pad_id=2, pad_to_multiple_of=4, attn_implementation="flash_attention_2")
    assert {k: v.tolist() for k, v in flash.items()} == {k: v.tolist() for k, v in batch.items()}

    packed = [{"input_ids": [1, 5, 1, 7, 8], "labels": [IGN, 5, IGN, 7, 8], "position_ids": [0, 1, 0, 1, 2]}]
    batch = pad_batch(packed, pad_id=2, pad_to_multiple_of=8)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2]]  # padding is its own segment
    assert batch["labels"].tolist() == [[IGN, 5, IGN, 7, 8, IGN, IGN, IGN]]


def test_flash_layout_by_hand():
    rows = [{"input_ids": [1, 5, 1, 7, 8], "labels": [IGN, 5, IGN, 7, 8], "position_ids": [0, 1, 0, 1, 2]},
            {"input_ids": [1, 9, 4], "labels": [IGN, 9, 4], "position_ids": [0, 1, 2]}]
    rows = [dict(row, window_tokens=11, window_rows=4) for row in rows]
    batch = pad_batch(rows, pad_id=2, pad_to_multiple_of=4, attn_implementation="flash_attention_2")
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[1, 5, 1, 7, 8, 1, 9, 4]]  # no padding: 8 is a multiple of 4
    assert batch["labels"].tolist() == [[IGN, 5, IGN, 7, 8, IGN, 9, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2]]
    assert (batch["num_tokens"].item(), batch["window_tokens"].item(), batch["window_rows"].item()) == (8, 11, 4)

    padded = pad_batch(rows, pad_id=2, pad_to_multiple_of=None)  # (2, 5) -> flatten with a 3-token tail
    flat = flatten_packed(padded, torch.tensor([5, 3]), pad_id=2, pad_to_multiple_of=12)
    assert flat["input_ids"].tolist() == [[1, 5, 1, 7, 8, 1, 9, 4, 2, 2, 2, 2]]
    assert flat["labels"].tolist() == [[IGN, 5, IGN, 7, 8, IGN, 9, 4, IGN, IGN, IGN, IGN]]
    assert flat["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2, 0, 1, 2, 3]]  # the tail restarts at 0


def test_flash_layout_is_what_transformers_treats_as_packed():
    rows = packed_rows()
    plain = pad_batch(rows, pad_id=2, pad_to_multiple_of=8)
    assert plain["position_ids"].shape == (3, 16)
    # the bug: transformers' FA2 forward reads packing from position_ids only at batch size 1, so a
    # (B, T) packed batch would run as plain causal rows, each example seeing the ones before it
    assert not _is_packed_sequence(plain["position_ids"], batch_size=3)

    flat = pad_batch(rows, pad_id=2, pad_to_multiple_of=8, attn_implementation="flash_attention_2")
    assert flat["input_ids"].shape == flat["labels"].shape == flat["position_ids"].shape == (1, 24)
    assert _is_packed_sequence(flat["position_ids"], batch_size=1)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(flat["position_ids"])
    assert cu_q.tolist() == cu_k.tolist() == STARTS + [REAL, 24]  # the examples, then the 5-token tail
    assert int(max_q) == int(max_k) == 6
    assert flat["input_ids"][0, :REAL].tolist() == sum(EXAMPLES, [])
    assert (flat["labels"][0, cu_q[:-1].long()] == IGN).all()  # no loss across any boundary
    assert flat["num_tokens"].item() == plain["num_tokens"].item() == REAL


@functools.cache
def flex_cpu_problem() -> str | None:
    """Why flex_attention cannot run on this CPU (it compiles a C++ kernel), or None."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    try:
        q = torch.randn(1, 1, 4, 32)
        mask = create_block_mask(lambda b, h, i, j: i >= j, 1, None, 4, 4, device="cpu")
        torch.compile(flex_attention)(q, q, q, block_mask=mask)
    except Exception as error:  # no compiler, or this torch has no CPU flex kernel
        return f"torch {torch.__version__} cannot run flex_attention on CPU: {type(error).__name__}: {error}"[:300]
    return None


def tiny_mistral(attn_implementation: str) -> MistralForCausalLM:
    torch.manual_seed(0)
    # head_dim 32: torch 2.13's compiled CPU flex kernel gives wrong or NaN outputs at some lengths
    # for head_dim 8 or 16 (seen at T=8 and T=40), which would say nothing about our layout
    config = MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, attn_implementation=attn_implementation)
    return MistralForCausalLM(config).eval()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa", "flex_attention"])
def test_packed_logits_equal_separate_examples(attn_implementation):
    if attn_implementation == "flex_attention" and flex_cpu_problem():
        pytest.skip(flex_cpu_problem())
    model = tiny_mistral(attn_implementation)
    rows = packed_rows()
    rows_batch = pad_batch(rows, pad_id=2, pad_to_multiple_of=8)  # (3, 16), this implementation's layout
    flat = flatten_packed(rows_batch, torch.tensor([len(r["input_ids"]) for r in rows]), 2, 8)  # (1, 24)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in EXAMPLES]
        by_row = model(input_ids=rows_batch["input_ids"], position_ids=rows_batch["position_ids"], use_cache=False).logits
        by_flat = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False).logits[0]
        # the same rows without restarting positions: examples would see each other, so the test can fail
        leaky = model(input_ids=rows_batch["input_ids"], use_cache=False).logits
    # (row, start) of each example in the (3, 16) batch
    places = [(0, 0), (0, 5), (1, 0), (1, 6), (2, 0)]
    for ids, want, (row, start), flat_start in zip(EXAMPLES, alone, places, STARTS):
        n = len(ids)
        torch.testing.assert_close(by_row[row, start : start + n], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(by_flat[flat_start : flat_start + n], want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(leaky[1, 6:9], alone[3], atol=1e-3)


def test_completion_scores_of_the_flash_layout_equal_the_rows():
    model = tiny_mistral("sdpa")
    rows = packed_rows()
    rows_batch = pad_batch(rows, pad_id=2, pad_to_multiple_of=8)
    flat = pad_batch(rows, pad_id=2, pad_to_multiple_of=8, attn_implementation="flash_attention_2")
    with torch.no_grad():
        by_row = model_completion_scores(model, rows_batch)
        by_flat = model_completion_scores(model, flat, max_groups=4)  # packed: always one pass
    assert by_flat.logp_sum.shape == (1,)
    assert by_flat.token_count.item() == by_row.token_count.sum().item() == REAL - len(EXAMPLES)
    torch.testing.assert_close(by_flat.logp_sum.sum(), by_row.logp_sum.sum(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("attn_implementation, shape", [("sdpa", (3, 16)), ("flash_attention_2", (1, 24))])
def test_sft_data_module_lays_packed_rows_out_for_the_models_attention(attn_implementation, shape):
    cfg = compose_config(["data.packing=true", f"model.attn_implementation={attn_implementation}"])
    datamodule = instantiate(cfg.data)  # no model: flash-attn is not installed here
    assert datamodule.attn_implementation == attn_implementation
    datamodule.pad_id = 2
    batch = datamodule.collate()(packed_rows())
    assert batch["input_ids"].shape == batch["position_ids"].shape == shape


def test_smoke_packed_check_runs_its_comparison_on_cpu():
    """``python -m zephyr_lit.smoke``'s packed check, through eager on CPU (its FA2 run needs a GPU)."""
    from zephyr_lit.smoke import PACKED_TOLERANCE, _packed_errors, packed_flash_check

    if not torch.cuda.is_available():
        assert "skipped" in packed_flash_check()
    error, _ = _packed_errors("eager", "cpu")
    assert error < PACKED_TOLERANCE
