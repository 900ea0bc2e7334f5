"""train(cfg) end to end on the embedded default: learning, files, export, resume, exact loss scaling."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from zephyr_lit.run import train


def val_losses(metrics_csv):
    with open(metrics_csv, newline="") as handle:
        return [(int(r["step"]), float(r["val/loss"])) for r in csv.DictReader(handle) if r.get("val/loss")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, hf_cache):
    """One short dSFT run shared by the tests below (about 20 s on 2 CPU cores)."""
    from tests.conftest import FAST, compose_config

    root = tmp_path_factory.mktemp("e2e")
    cfg = compose_config(
        [f"paths.root={root / 'outputs'}", f"paths.output_dir={root / 'outputs' / 'dsft' / 'run1'}",
         f"data.cache_dir={hf_cache}", *FAST, "data.max_train_samples=null", "trainer.max_steps=150",
         "trainer.max_epochs=10", "optim.lr=3e-3"]
    )
    summary = train(cfg, overrides=["trainer.max_steps=150"])
    return root, cfg, summary


def test_run_writes_the_documented_files(trained):
    root, cfg, summary = trained
    run = root / "outputs" / "dsft" / "run1"
    assert (run / "model" / "model.safetensors").exists()
    assert (run / "model" / "generation_config.json").exists()
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "metrics.csv").exists()
    written = json.loads((run / "summary.json").read_text())
    assert written["export_dir"] == str(run / "model") and written["global_step"] == 150
    assert written["overrides"] == ["trainer.max_steps=150"]
    assert set(written["metrics"]) >= {"val/loss", "val/perplexity", "val/exact_match"}
    assert (root / "outputs" / "dsft" / "latest").resolve() == run.resolve()
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in run.iterdir())


def test_validation_runs_before_the_first_step_and_on_the_final_weights(trained):
    root, _, summary = trained
    losses = val_losses(root / "outputs" / "dsft" / "run1" / "metrics.csv")
    assert losses[0][0] == 0 and losses[-1][0] == 150  # 150 steps end mid-epoch: validated anyway
    first, last = losses[0][1], losses[-1][1]
    assert first > 5.0  # random init over a ~1k vocabulary: about ln(1024) = 6.9
    assert last < 0.5 * first, f"held-out loss did not fall enough: {first:.3f} -> {last:.3f}"
    assert summary["metrics"]["val/loss"] == pytest.approx(last, rel=1e-5)
    assert summary["metrics"]["val/perplexity"] == pytest.approx(torch.exp(torch.tensor(last)).item(), rel=1e-4)


def test_export_loads_in_a_pipeline_and_chats(trained):
    from transformers import pipeline

    root, _, _ = trained
    pipe = pipeline("text-generation", model=str(root / "outputs" / "dsft" / "run1" / "model"), device="cpu")
    messages = [
        {"role": "system", "content": "You are a friendly chatbot who always responds in the style of a pirate"},
        {"role": "user", "content": "What is 3 + 4?"},
    ]
    prompt = pipe.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n") and not prompt.startswith("<s>")
    out = pipe(prompt, max_new_tokens=16, do_sample=True, temperature=0.7, top_k=50, top_p=0.95)
    reply = out[0]["generated_text"][len(prompt):]
    assert len(reply.strip()) > 0
    assert pipe.model.generation_config.eos_token_id == pipe.tokenizer.eos_token_id
    assert pipe.model.generation_config.pad_token_id == pipe.tokenizer.pad_token_id


def test_resume_from_last_continues_the_same_run(trained, make_cfg):
    root, _, _ = trained
    run = root / "outputs" / "dsft" / "run1"
    before = val_losses(run / "metrics.csv")
    cfg = make_cfg("data.max_train_samples=null", "trainer.max_steps=160", "trainer.max_epochs=10",
                   "optim.lr=3e-3", "ckpt_path=last", output_dir=run)
    summary = train(cfg)
    assert summary["global_step"] == 160
    after = val_losses(run / "metrics.csv")
    assert after[: len(before)] == before  # appended to the same file
    assert after[-1][0] == 160 and after[-1][1] < before[0][1]
    assert not (run / "version_0").exists() and not (run / "lightning_logs").exists()


def _one_step_weights(make_cfg, tmp_path, name, *overrides):
    cfg = make_cfg(
        "optim.optimizer._target_=torch.optim.SGD", "~optim.optimizer.betas", "~optim.optimizer.eps",
        "optim.lr=0.5", "optim.warmup_ratio=0", "optim.scheduler=constant", "trainer.gradient_clip_val=null",
        "data.shuffle=false", "trainer.max_steps=1", "callbacks.validate_at_edges=null", "data.max_eval_samples=8",
        *overrides, output_dir=tmp_path / name,
    )
    train(cfg, update_latest=False)
    return load_file(tmp_path / name / "model" / "model.safetensors")


def test_accumulated_micro_batches_give_the_global_token_mean(make_cfg, tmp_path):
    """One SGD step on rows 0..3 as one batch of 4, or as 2 micro-batches of 2 (accumulated), or as
    4 micro-batches of 1: the loss is the mean over all label tokens of the 4 rows, so the three
    updates agree. (A mean of per-micro-batch means would weight rows with few tokens more.)"""
    whole = _one_step_weights(make_cfg, tmp_path, "b4", "data.batch_size=4")
    halves = _one_step_weights(make_cfg, tmp_path, "b2x2", "data.batch_size=2", "trainer.accumulate_grad_batches=2")
    singles = _one_step_weights(make_cfg, tmp_path, "b1x4", "data.batch_size=1", "trainer.accumulate_grad_batches=4")
    start = _one_step_weights(make_cfg, tmp_path, "b0", "data.batch_size=4", "optim.lr=1e-12")
    for name, weight in whole.items():
        torch.testing.assert_close(halves[name], weight, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(singles[name], weight, atol=1e-5, rtol=1e-4)
    assert max((whole[n] - start[n]).abs().max() for n in whole) > 1e-3  # the step did move the weights


def test_packed_training_with_gradient_checkpointing_learns(make_cfg):
    cfg = make_cfg("data.packing=true", "data.max_length=128", "model.gradient_checkpointing=true",
                   "trainer.max_steps=8", "optim.lr=3e-3", "data.batch_size=4", "data.exact_match_path=null")
    summary = train(cfg, update_latest=False)
    stats = summary["data"]["train_sft"]
    assert stats["rows"] == 256  # FAST: 256 conversations, packed into fewer rows of <= 128 tokens
    assert summary["global_step"] == 8
    assert summary["metrics"]["val/loss"] < summary["initial_metrics"]["val/loss"] - 0.5
