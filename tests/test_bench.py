"""The benchmark's pure helpers: workload rows, batch plans, throughput arithmetic, the table.

No trainer runs here (``python -m zephyr_lit.bench --quick`` does that, in minutes).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from zephyr_lit.bench.cases import CASES, select_cases
from zephyr_lit.bench.cli import plan_runs
from zephyr_lit.bench.measure import mfu, peak_tflops, summarise
from zephyr_lit.bench.report import format_table, loss_gap, summarise_case
from zephyr_lit.bench.workload import (
    IGNORE_INDEX,
    Workload,
    dpo_rows,
    label_count,
    mistral_config,
    pair_length,
    pair_tokens,
    parameter_count,
    plan_steps,
    rows_needed,
    sequential_batches,
    sft_rows,
    window_label_tokens,
)

SMALL = Workload(pairs=24, sequences=20, vocab=1000)


def test_rows_are_seeded_in_range_and_never_need_truncation():
    pairs, again = dpo_rows(SMALL), dpo_rows(SMALL)
    assert pairs == again and len(pairs) == 24
    assert dpo_rows(dataclasses.replace(SMALL, seed=1)) != pairs
    for i, row in enumerate(pairs):
        assert row["index"] == i
        assert SMALL.prompt_min <= len(row["prompt_input_ids"]) <= SMALL.prompt_max
        for side in ("chosen", "rejected"):
            assert SMALL.completion_min <= len(row[f"{side}_input_ids"]) <= SMALL.completion_max
        ids = row["prompt_input_ids"] + row["chosen_input_ids"] + row["rejected_input_ids"]
        assert all(3 <= t < SMALL.vocab for t in ids)
        assert pair_length(row) <= SMALL.max_length
    row = pairs[0]
    assert pair_tokens(row) == 2 * len(row["prompt_input_ids"]) + len(row["chosen_input_ids"]) + len(
        row["rejected_input_ids"])

    sequences = sft_rows(SMALL)
    assert len(sequences) == 20 and sequences == sft_rows(SMALL)
    for row in sequences:
        assert SMALL.sequence_min <= len(row["input_ids"]) <= SMALL.sequence_max
        assert row["labels"][0] == IGNORE_INDEX and row["labels"][1:] == row["input_ids"][1:]
        assert label_count(row["labels"]) == len(row["input_ids"]) - 1


def test_batch_plans():
    assert sequential_batches(5, 2) == [[0, 1], [2, 3], [4]]
    # dpo-best's batches come from the data modules' sampler (data.group_by_length=true)
    from zephyr_lit.bench.ours import grouped_batches

    w = Workload(pairs=8, pair_batch=2, prompt_min=1, prompt_max=9, completion_min=1, completion_max=9)
    rows = dpo_rows(w)
    lengths = [pair_length(r) for r in rows]
    grouped = grouped_batches(w, rows, epoch=0)
    assert sorted(i for b in grouped for i in b) == list(range(8))
    assert all(len(b) == 2 for b in grouped)
    # one mega-batch here: the batches hold neighbours in length order, the longest first
    pairs_by_length = sorted(range(8), key=lambda i: -lengths[i])
    expected = {frozenset(lengths[i] for i in pairs_by_length[j : j + 2]) for j in range(0, 8, 2)}
    assert {frozenset(lengths[i] for i in b) for b in grouped} == expected
    assert max(lengths[i] for i in grouped[0]) == max(lengths)
    assert grouped == grouped_batches(w, rows, epoch=0)

    # rows read in order by `steps` optimizer steps: both sides get only those
    assert rows_needed(Workload(steps=10), "dpo") == 80 and rows_needed(Workload(steps=10), "sft") == 80
    assert rows_needed(Workload(steps=40, accumulate=2), "dpo") == 256  # more than an epoch: all rows
    assert rows_needed(Workload(steps=None), "sft") == 256

    epochs = []
    plan = plan_steps(lambda e: epochs.append(e) or [[e, 0], [e, 1]], steps=3)
    assert plan == [[0, 0], [0, 1], [1, 0]] and epochs == [0, 1]
    assert plan_steps(lambda e: [[e]], steps=None) == [[0]]
    assert plan_steps(lambda e: [[0], [1], [2]], steps=1, accumulate=2) == [[0], [1]]
    assert window_label_tokens([[0], [1], [2]], counts=[10, 20, 30], accumulate=2) == [30, 30, 30]


def test_workload_overrides_and_checks():
    w = Workload().with_overrides(["layers=2", "lr=0.001", "steps=6", "attn=eager"])
    assert (w.layers, w.lr, w.steps, w.attn) == (2, 0.001, 6, "eager")
    assert Workload(steps=5).with_overrides(["steps=none"]).steps is None
    with pytest.raises(ValueError, match="key=value"):
        Workload().with_overrides(["nope=1"])
    with pytest.raises(ValueError, match="no timed step"):
        Workload(steps=3, warmup=3).check()
    with pytest.raises(ValueError, match="max_length"):
        Workload(max_length=256).check()


def test_model_shape():
    assert parameter_count(Workload()) == {"total": 31_990_272, "compute": 31_990_272 - 8192 * 512}
    config = mistral_config(Workload())
    assert config["head_dim"] * config["num_attention_heads"] == config["hidden_size"] == 512
    assert config["pad_token_id"] < config["vocab_size"]


def test_throughput_counts_only_timed_steps():
    steps = [{"t": 10.0, "tokens": 999, "rows": 8, "loss": 1.0},
             {"t": 12.0, "tokens": 100, "rows": 8, "loss": 0.9},
             {"t": 13.0, "tokens": 300, "rows": 8, "loss": 0.8}]
    out = summarise(steps, warmup=1)
    assert out["timed_steps"] == 2 and out["timed_s"] == 3.0
    assert out["tokens_per_s"] == pytest.approx(400 / 3) and out["rows_per_s"] == pytest.approx(16 / 3)
    assert out["step_s"] == [2.0, 1.0] and out["losses"] == [1.0, 0.9, 0.8]
    assert summarise(steps, warmup=0, train_start=9.0)["timed_s"] == 4.0
    with pytest.raises(ValueError, match="none left"):
        summarise(steps, warmup=3)


def test_mfu_and_peaks():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "float32") == 67.0
    assert peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert peak_tflops("Some CPU", "float32") is None
    assert mfu(1_000_000, 1e6, 6.0) == pytest.approx(1.0)
    assert mfu(1, 1.0, None) is None


def _run(case, side, repeat=0, **values):
    base = {"case": case, "side": side, "repeat": repeat, "rows_per_s": 1.0, "tokens_per_s": 100.0,
            "peak_rss_mib": 1000.0, "cuda_peak_mib": None, "setup_s": 2.0, "losses": [0.7, 0.6]}
    return base | values


def test_case_summary_and_table():
    case = select_cases(["dpo-online"])[0]
    runs = [_run("dpo-online", "ours", tokens_per_s=200.0, rows_per_s=2.0, losses=[0.7, 0.6001]),
            _run("dpo-online", "trl"),
            _run("dpo-online", "ours", repeat=1, tokens_per_s=300.0, rows_per_s=3.0),
            _run("dpo-online", "trl", repeat=1, error="Traceback\nBoom")]
    summary = summarise_case(case, runs, compute_params=10, peak=None)
    assert summary["ours"]["tokens_per_s"] == 250.0 and summary["trl"]["ok"] == 1
    assert summary["tokens_per_s_ratio"] == 2.5 and summary["peak_rss_mib_ratio"] == 1.0
    assert summary["loss_gap"] == pytest.approx(1e-4)
    table = format_table([summary], "header", cuda=False)
    assert "dpo-online" in table and "2.50x" in table and "FAILED: trl" in table
    assert loss_gap({"losses": [1.0]}, {"losses": [1.0, 2.0]}) is None


def test_cases_and_run_order():
    assert {c.kind for c in CASES} == {"dpo", "sft"}
    assert [c.name for c in select_cases(["sft"])] == ["sft-padded", "sft-padding-free", "sft-packed"]
    with pytest.raises(ValueError, match="unknown"):
        select_cases(["nope"])
    order = [(r, c.name, s) for r, c, s in plan_runs(select_cases(["dpo-online"]), 2, ["ours", "trl"])]
    assert order == [(0, "dpo-online", "ours"), (0, "dpo-online", "trl"),
                     (1, "dpo-online", "trl"), (1, "dpo-online", "ours")]


def test_targets_pick_the_fastest_case_of_each_side_and_check_memory():
    from zephyr_lit.bench.report import check_targets, format_targets

    def case(name, ours, trl, ours_tok=None, trl_tok=None, memory=(100.0, 100.0)):
        side = lambda rows, tok, mem: {"rows_per_s": rows, "tokens_per_s": tok, "peak_rss_mib": mem}  # noqa: E731
        return {"case": name, "ours": side(ours, ours_tok, memory[0]), "trl": side(trl, trl_tok, memory[1]),
                "peak_rss_mib_ratio": memory[0] / memory[1]}

    summaries = [
        case("dpo-online", 1.3, 1.0),  # exactly the target: met
        case("dpo-precompute", 1.2, 1.0),  # 1.2 < 1.3: missed
        case("sft-padded", 1, 1, ours_tok=500, trl_tok=400),
        case("sft-packed", 1, 1, ours_tok=700, trl_tok=300, memory=(110.0, 100.0)),
    ]
    checks = {c["what"]: c for c in check_targets(summaries, cuda=False)}
    assert checks["DPO pairs/s, equal settings, online reference"]["met"]
    assert not checks["DPO pairs/s, equal settings, precomputed reference"]["met"]
    sft = checks["SFT tokens/s, our best vs TRL's best configuration"]
    assert sft["ratio"] == pytest.approx(700 / 400) and (sft["ours_case"], sft["trl_case"]) == ("sft-packed", "sft-padded")
    assert not checks["peak memory, sft-packed"]["met"] and checks["peak memory, sft-padded"]["met"]
    assert "DPO pairs/s, our best settings vs TRL default" not in checks  # case not run
    text = format_targets(list(checks.values()))
    assert "MISSED DPO pairs/s, equal settings, precomputed reference: 1.20x, target >= 1.3x" in text


# ---- the LoRA case ------------------------------------------------------------------------------------------------
TINY_LORA = Workload(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=512, lora_r=4)


def test_the_lora_case_gives_both_sides_the_same_adapter():
    from zephyr_lit.bench.lora import TARGETS, ours_overrides

    case = select_cases(["dpo-lora"])[0]
    assert case in select_cases(["dpo"]) and case.same_batches
    assert case.ours["peft"] == case.trl["peft"] == "lora" and not case.trl["ref_model"]  # the adapter-off reference
    assert ours_overrides(TINY_LORA) == ["peft=lora", "peft.r=4", "peft.alpha=16.0", "peft.dropout=0.0",
                                         f"peft.target_modules=[{','.join(TARGETS)}]", "peft.lr_scale=1.0"]


def test_the_lora_init_is_seeded_and_lands_once_in_a_peft_model():
    """2 layers x 7 linears x (A, B) = 28 tensors; A (r, d_in) within 1/sqrt(d_in), B (d_out, r) within
    0.1/sqrt(r); the same seed gives the same values, and they replace every adapter value of a peft model."""
    from peft import get_peft_model

    from zephyr_lit.bench.lora import lora_init, load_lora_init, trl_peft_config

    values = lora_init(TINY_LORA)
    assert len(values) == 28 and all(torch.equal(v, lora_init(TINY_LORA)[k]) for k, v in values.items())
    assert values["layers.1.mlp.down_proj.lora_A"].shape == (4, 96)  # r x d_in
    assert values["layers.0.self_attn.k_proj.lora_B"].shape == (32, 4)  # d_out (2 KV heads x 16) x r
    assert values["layers.0.mlp.down_proj.lora_A"].abs().max() <= 1 / 96**0.5
    assert values["layers.0.mlp.down_proj.lora_B"].abs().max() <= 0.1 / 4**0.5
    assert not torch.equal(lora_init(dataclasses.replace(TINY_LORA, seed=1))["layers.0.mlp.up_proj.lora_A"],
                           values["layers.0.mlp.up_proj.lora_A"])

    model = get_peft_model(MistralForCausalLM(MistralConfig(**mistral_config(TINY_LORA))), trl_peft_config(TINY_LORA))
    assert load_lora_init(model, TINY_LORA) == 28
    weight = model.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight
    assert torch.equal(weight, values["layers.1.mlp.down_proj.lora_B"])
    with pytest.raises(ValueError, match="does not match the bench's LoRA init"):
        load_lora_init(model, dataclasses.replace(TINY_LORA, lora_r=8))
    plain = MistralForCausalLM(MistralConfig(**mistral_config(TINY_LORA)))
    with pytest.raises(ValueError, match="28 of the 28 LoRA init tensors found no adapter parameter"):
        load_lora_init(plain, TINY_LORA)


@pytest.mark.slow
def test_the_lora_case_runs_ours_and_trl_to_the_same_losses(tmp_path):
    """``python -m zephyr_lit.bench --quick --cases dpo-lora`` on a tiny model and short rows: both trainers run,
    train the same number of adapter parameters, and their per-step losses agree, away from ln 2 (the adapter's
    shared start values already move the policy off the reference)."""
    import json
    import math

    from zephyr_lit.bench.cli import main

    argv = ["--quick", "--cases", "dpo-lora", "--out", str(tmp_path), "--set", "hidden=64", "intermediate=96",
            "layers=2", "heads=4", "kv_heads=2", "vocab=512", "lora_r=4", "max_length=64", "prompt_min=8",
            "prompt_max=24", "completion_min=8", "completion_max=24", "sequence_min=8", "sequence_max=64", "steps=3",
            "warmup=1"]
    assert main(argv) == 0
    runs = {r["side"]: r for r in map(json.loads, (tmp_path / "runs.jsonl").read_text().splitlines())}
    ours, trl = runs["ours"], runs["trl"]
    assert ours["info"]["trainable_params"] == trl["info"]["trainable_params"] == 2 * 4 * (
        (64 + 64) * 2 + (64 + 32) * 2 + (64 + 96) * 3)  # layers x r x sum of (d_in + d_out) over the 7 linears
    assert len(ours["losses"]) == len(trl["losses"]) == 3
    assert max(abs(a - b) for a, b in zip(ours["losses"], trl["losses"])) < 1e-4
    assert abs(ours["losses"][0] - math.log(2)) > 1e-3
    summary = json.loads((tmp_path / "summary.json").read_text())["cases"][0]
    assert summary["case"] == "dpo-lora" and summary["peak_rss_mib_ratio"] > 0 and summary["rows_per_s_ratio"] > 0
