"""Real DeepSpeed ZeRO-3 on CPU processes (gloo), through ``zephyr_lit.run.train``.

Each run is ``tests/zero3/run_zero3.py`` in a subprocess (Lightning re-executes it for rank 1) with
the test-only ``CPUDeepSpeedStrategy``; ``tests/zero3/probe.py`` records per rank whether the
models are partitioned and hashes of their gathered weights at the start and end of ``fit``.
``stage3_param_persistence_threshold=0`` so that even the tiny model's parameters are partitioned.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import odd_exact_match
from tests.zero3.launch import run_zero3
from zephyr_lit.assets import TINY_MODEL, asset_path
from zephyr_lit.models import ModelSpec, build_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY_DPO = ["+experiment=ddpo", "model.name_or_path=${asset:tiny-mistral}", "model.random_init=true",
            "data.batch_size=4", "data.max_train_samples=64", "data.max_eval_samples=16"]


def model_states_bytes(run: Path) -> int:
    return sum(p.stat().st_size for p in (run / "checkpoints" / "last.ckpt").rglob("*model_states.pt"))


def test_dpo_policy_and_frozen_reference_partitioned_trained_saved_and_resumed(tmp_path):
    first = run_zero3(tmp_path, "first", *TINY_DPO, "trainer.max_steps=2")
    for facts in first:
        for name in ("policy", "reference"):
            assert facts[f"{name}/partitioned"]  # every parameter is a ZeRO-3 shard (has ds_id)
            assert 0 < facts[f"{name}/local_numel"] <= facts[f"{name}/full_numel"] // 2 + 64  # half on each rank
        assert facts["reference/dtype"] == facts["policy/dtype"] == "torch.float32"
        assert not facts["reference/requires_grad"] and not facts["optimizer/has_reference"]
        assert facts["reference/training_in_steps"] == [False]  # eval mode in every training step
        assert facts["reference/start"] == facts["policy/start"]  # same weights at start
        assert facts["reference/end"] == facts["reference/start"]  # bit-identical after training
        assert facts["policy/end"] != facts["policy/start"]
    assert first[0] == first[1]  # both ranks saw the same gathered models

    run = tmp_path / "run"
    ranks = sorted(p.name for p in (run / "checkpoints" / "last.ckpt" / "checkpoint").glob("*optim_states.pt"))
    assert ranks == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    without_reference = model_states_bytes(run)

    resumed = run_zero3(tmp_path, "resumed", *TINY_DPO, "trainer.max_steps=3", "ckpt_path=last")
    for facts in resumed:
        assert facts["global_step"] == 3
        assert facts["policy/start"] == first[0]["policy/end"]  # the sharded checkpoint restored the policy
        assert facts["reference/start"] == first[0]["reference/start"]  # and the rebuilt reference is the same
        assert facts["policy/end"] != facts["policy/start"]

    export = load_file(run / "model" / "model.safetensors")  # consolidated, one file, full shapes
    assert export["model.embed_tokens.weight"].shape == (1024, 128)
    assert len(export) == 39

    # TR-DPO moves the reference: checkpoints must keep it, and resuming gives it back
    synced = run_zero3(tmp_path, "synced", *TINY_DPO, "trainer.max_steps=2", "dpo.ref.sync_steps=2",
                       "paths.output_dir=" + str(tmp_path / "run_sync"))
    assert synced[0]["reference/end"] != synced[0]["reference/start"]
    assert model_states_bytes(tmp_path / "run_sync") > 10 * without_reference  # exclude_frozen_parameters shrank it
    again = run_zero3(tmp_path, "synced_resumed", *TINY_DPO, "trainer.max_steps=3", "dpo.ref.sync_steps=2",
                      "ckpt_path=last", "paths.output_dir=" + str(tmp_path / "run_sync"))
    assert all(facts["reference/start"] == synced[0]["reference/end"] for facts in again)


def test_dpo_bf16_mixed_with_precomputed_reference_and_exact_match(tmp_path):
    facts = run_zero3(tmp_path, "bf16", *TINY_DPO, "trainer.max_steps=2", "trainer.precision=bf16-mixed",
                      "dpo.ref.precompute=true", "data.exact_match_path=${asset:data/ultrachat_tiny/exact_match.jsonl}")
    assert facts[0]["policy/dtype"] == "torch.bfloat16" and facts[0]["policy/partitioned"]
    assert "reference/start" not in facts[0]  # freed once its log-probs were cached
    assert all(rank["reference/released"] for rank in facts)  # and really: no one holds its parameters
    assert len(list((tmp_path / "cache").rglob("train.pt"))) == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "val/exact_match" in summary["metrics"]  # greedy generation stayed in step on both ranks
    assert summary["metrics"]["val/rewards/accuracies"] >= 0
    export = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert export["lm_head.weight"].dtype == torch.bfloat16  # the 16-bit gather


def test_lora_dpo_trains_the_adapter_alone_on_the_partitioned_base_saves_it_alone_and_resumes(tmp_path):
    """peft=lora on 2 ranks: base and adapter partitioned, no second model (the reference is the policy
    with its adapter off), the policy starts as the start model (B = 0 on the gathered adapter: the first
    validation's rewards are exactly 0), only the adapter moves, the sharded checkpoint holds the adapter
    and its Adam moments alone, a resume restores them, and the export merges the gathered adapter."""
    first = run_zero3(tmp_path, "lora", *TINY_DPO, "peft=lora", "trainer.max_steps=2")
    for facts in first:
        assert facts["policy/partitioned"] and 0 < facts["policy/local_numel"] <= facts["policy/full_numel"] // 2 + 64
        assert "reference/start" not in facts  # no reference model was built
        assert facts["policy/training_in_steps"] == [True]  # the shared policy trains in train mode
        assert facts["base/end"] == facts["base/start"] and facts["adapter/end"] != facts["adapter/start"]
    assert first[0] == first[1]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["initial_metrics"]["val/rewards/margins"] == summary["initial_metrics"]["val/rewards/chosen"] == 0.0

    folder = tmp_path / "run" / "checkpoints" / "last.ckpt" / "checkpoint"
    model_states = torch.load(folder / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert len(model_states["module"]) == 56 and all("lora_" in key for key in model_states["module"])
    adapter_numel = sum(math.prod(shape) for shape in model_states["param_shapes"][0].values())
    moments = [torch.load(folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", map_location="cpu", weights_only=False)
               ["optimizer_state_dict"]["optimizer_state_dict"]["state"][0]["exp_avg"].numel() for r in (0, 1)]
    assert sum(moments) == adapter_numel == 155648  # 4 blocks x 38912: the adapter's, halved over 2 ranks

    resumed = run_zero3(tmp_path, "lora_resumed", *TINY_DPO, "peft=lora", "trainer.max_steps=3", "ckpt_path=last")
    for facts in resumed:
        assert facts["global_step"] == 3 and facts["adapter/start"] == first[0]["adapter/end"]
        assert facts["base/start"] == facts["base/end"] == first[0]["base/start"]

    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")  # full shapes, gathered
    merged = load_file(tmp_path / "run" / "model" / "model.safetensors")
    start = build_model(ModelSpec(asset_path(TINY_MODEL), random_init=True, init_seed=42)).state_dict()  # seed=42
    prefix = "base_model.model.model.layers.1.mlp.up_proj"
    by_hand = start["model.layers.1.mlp.up_proj.weight"] + adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
    torch.testing.assert_close(merged["model.layers.1.mlp.up_proj.weight"], by_hand, atol=1e-6, rtol=1e-5)  # alpha / r = 1
    assert torch.equal(merged["lm_head.weight"], start["lm_head.weight"]) and len(merged) == 39


def test_accumulation_under_deepspeed_matches_one_big_batch(tmp_path):
    """DeepSpeed divides the loss by the accumulation steps itself: one SGD step on rows 0..3 as
    2 accumulated micro-batches of 2 must equal one batch of 4 (it was half before the fix)."""
    sgd = ["optim.optimizer._target_=torch.optim.SGD", "~optim.optimizer.betas", "~optim.optimizer.eps",
           "optim.lr=0.5", "trainer.gradient_clip_val=null", "data.shuffle=false", "trainer.max_steps=1",
           "callbacks.validate_at_edges=null", "callbacks.checkpoint=null", "data.max_train_samples=64",
           "data.max_eval_samples=8"]
    weights = {}
    for name, extra in {"b4": ["data.batch_size=4"], "b2x2": ["data.batch_size=2", "trainer.accumulate_grad_batches=2"],
                        "start": ["data.batch_size=4", "optim.lr=1e-12"]}.items():
        run_zero3(tmp_path, name, *sgd, *extra, f"paths.output_dir={tmp_path / name}", devices=1)
        weights[name] = load_file(tmp_path / name / "model" / "model.safetensors")
    for key, value in weights["b4"].items():
        torch.testing.assert_close(weights["b2x2"][key], value, atol=1e-6, rtol=1e-5)
    assert max(float((weights["b4"][k] - weights["start"][k]).abs().max()) for k in weights["b4"]) > 1e-3


def test_dpo_from_a_saved_model_loads_into_the_shards(tmp_path):
    """The real recipes' path: ``from_pretrained`` inside ``configure_model`` (under ``zero.Init``) on 2
    ranks. Policy and reference must start from exactly the saved weights (without a live
    ``HfDeepSpeedConfig`` transformers would leave them random, "mismatched" with shape [0])."""
    sys.path.insert(0, str(REPO / "tests" / "zero3"))
    from probe import state_digest  # noqa: E402

    from zephyr_lit.export import export_model
    from zephyr_lit.models import ModelSpec, build_model, load_tokenizer
    from zephyr_lit.assets import asset_path

    spec = ModelSpec(asset_path("tiny-mistral"), random_init=True, init_seed=7)
    saved = export_model(build_model(spec), load_tokenizer(spec), tmp_path / "sft-model")
    expected = state_digest(load_file(saved / "model.safetensors"))
    facts = run_zero3(tmp_path, "loaded", "+experiment=ddpo", f"model.name_or_path={saved}", "model.random_init=false",
                      "data.batch_size=4", "data.max_train_samples=64", "data.max_eval_samples=16", "trainer.max_steps=1")
    for rank in facts:
        assert rank["policy/partitioned"] and rank["reference/partitioned"]
        assert rank["policy/start"] == rank["reference/start"] == expected
        assert rank["reference/end"] == expected and rank["policy/end"] != expected


def test_unequal_validation_shards_and_exact_match_finish_and_equal_one_process(tmp_path):
    """7 validation pairs, one per batch, on 2 ranks: 4 and 3 real pairs, so rank 1 runs one batch of
    padding only; 5 exact-match prompts, 2 per ``generate``: 3 and 2 per rank (2 and 1 calls unpadded).
    Under ZeRO-3 every forward and every generated token gathers the shards on all ranks: with
    unequal loops rank 0 waited for ever in the first validation. Both runs start from the same saved
    weights; the 2-rank run's validation (before and after 2 steps) and exact match equal 1 process's."""
    from zephyr_lit.assets import asset_path
    from zephyr_lit.export import export_model
    from zephyr_lit.models import ModelSpec, build_model, load_tokenizer

    spec = ModelSpec(asset_path("tiny-mistral"), random_init=True, init_seed=3)
    saved = export_model(build_model(spec), load_tokenizer(spec), tmp_path / "start-model")
    common = ["+experiment=ddpo", f"model.name_or_path={saved}", "model.random_init=false", "trainer.max_steps=2",
              "data.max_train_samples=16", "data.max_eval_samples=7", "data.eval_batch_size=1", *odd_exact_match(tmp_path)]
    summaries = {}
    for name, devices, batch in (("two", 2, 4), ("one", 1, 8)):
        run_zero3(tmp_path, name, *common, f"data.batch_size={batch}", f"paths.output_dir={tmp_path / name}",
                  devices=devices, timeout=300)
        summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
    for key in ("initial_metrics", "metrics"):
        two, one = summaries["two"][key], summaries["one"][key]
        assert {"val/loss", "val/rewards/margins", "val/logps/chosen", "val/exact_match"} <= set(one)
        # rewards are beta x differences of log-probs of ~150 nats: float rounding of those (~1e-7
        # relative, the summation order differs after 2 steps on 2 ranks) is ~2e-6 of a reward
        assert two == pytest.approx(one, rel=1e-5, abs=2e-6), key
    assert summaries["one"]["metrics"]["val/logps/chosen"] != summaries["one"]["initial_metrics"]["val/logps/chosen"]
