"""Accumulation windows: every row of an epoch trains, and every optimizer step is its window's loss.

2-epoch runs whose epochs hold 5 micro-batches with ``trainer.accumulate_grad_batches=2``: windows
of 2, 2 and 1 micro-batches in each epoch, 6 optimizer steps. Plain SGD (lr constant, no clipping, no
weight decay), so each step's update is exactly ``-lr x`` the gradient of the loss it used. A recorder
callback (``tests/distributed/window_recorder.py``) keeps every micro-batch each rank trained on and
the full weights before and after every step; the test then takes each window's rows as ONE batch,
computes that batch's loss here from the logits (SFT: the token mean of the cross-entropy; DPO:
the mean over pairs of ``-log sigmoid(beta x margin)`` plus ``rpo_alpha x`` the chosen tokens' mean
NLL, the reference being the start weights) and checks that the update equals ``-lr x`` its gradient.

What it catches: dividing an epoch's short last window by the full accumulation count halves that
step's update; under DeepSpeed, whose own micro-step counter runs across epochs, windows straddle
epochs (a step mixes rows of two windows, or the last window never steps).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from tests.conftest import compose_config
from tests.zero3.launch import run_zero3
from zephyr_lit.assets import TINY_MODEL, asset_path
from zephyr_lit.data.collate import pad_batch
from zephyr_lit.data.tokenize import IGNORE_INDEX
from zephyr_lit.run import train

pytestmark = pytest.mark.slow
RECORDER = "tests.distributed.window_recorder.WindowRecorder"
LR = 0.5
SGD = ["optim.optimizer._target_=torch.optim.SGD", "~optim.optimizer.betas", "~optim.optimizer.eps",
       f"optim.lr={LR}", "optim.scheduler=constant", "optim.warmup_ratio=0", "trainer.gradient_clip_val=null",
       "trainer.max_epochs=2", "trainer.accumulate_grad_batches=2", "data.max_length=64",
       "data.exact_match_path=null", "data.max_eval_samples=8", "callbacks.validate_at_edges=null",
       "callbacks.checkpoint=null", "logger=csv", "trainer.enable_progress_bar=false",
       "trainer.enable_model_summary=false"]
# 20 rows: 5 micro-batches of 4 on one rank, or 5 global micro-steps of 2 x 2 ranks
SFT = ["data.max_train_samples=20"]
DPO = ["+experiment=ddpo", f"model.name_or_path={asset_path(TINY_MODEL)}", "model.random_init=true",
       "data.max_train_samples=20", "data.max_prompt_length=32", "dpo.rpo_alpha=0.5"]
BETA, ALPHA = 0.1, 0.5


def recorder(out) -> list[str]:
    return [f"+callbacks.window_recorder._target_={RECORDER}", f"+callbacks.window_recorder.out_dir={out}"]


def run_plain(tmp_path, hf_cache, *overrides: str) -> list[dict]:
    out = tmp_path / "record"
    cfg = compose_config([f"paths.root={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", f"data.cache_dir={hf_cache}",
                          *SGD, *overrides, "data.batch_size=4", *recorder(out)])
    train(cfg, update_latest=False)
    return [torch.load(out / "rank0.pt")]


def run_deepspeed(tmp_path, *overrides: str, devices: int) -> list[dict]:
    out = tmp_path / "record"
    run_zero3(tmp_path, "zero3", *SGD, *overrides, f"data.batch_size={4 // devices}", *recorder(out), devices=devices)
    return [torch.load(out / f"rank{r}.pt") for r in range(devices)]


# ---- the window's loss, computed here from the logits ---------------------------------------------
def model_with(weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(asset_path(TINY_MODEL))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.load_state_dict(weights)
    return model.float()


def unpadded_rows(batch: dict[str, torch.Tensor]) -> list[dict]:
    lengths = batch["attention_mask"].sum(-1).tolist()
    return [{"input_ids": batch["input_ids"][i, :n].tolist(), "labels": batch["labels"][i, :n].tolist()}
            for i, n in enumerate(lengths)]


def token_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, T-1)`` log p of each shifted label (0 where unlabelled), and the label mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def sft_window_loss(model, _reference, micro_batches) -> torch.Tensor:
    batch = pad_batch([row for mb in micro_batches for row in unpadded_rows(mb)], pad_id=2, pad_to_multiple_of=None)
    logp, mask = token_logps(model, batch)
    return -logp.sum() / mask.sum()


def dpo_window_loss(model, reference, micro_batches) -> torch.Tensor:
    chosen, rejected = [], []
    for mb in micro_batches:
        rows, size = unpadded_rows(mb), mb["index"].numel()
        chosen += rows[:size]
        rejected += rows[size:]
    batch = pad_batch(chosen + rejected, pad_id=2, pad_to_multiple_of=None)
    pairs = len(chosen)
    logp, mask = token_logps(model, batch)
    with torch.no_grad():
        ref = token_logps(reference, batch)[0].sum(-1)
    seq = logp.sum(-1)
    margin = (seq[:pairs] - ref[:pairs]) - (seq[pairs:] - ref[pairs:])
    chosen_nll = -logp[:pairs].sum() / mask[:pairs].sum()
    return -F.logsigmoid(BETA * margin).mean() + ALPHA * chosen_nll


def check_every_step_is_its_window(records: list[dict], window_loss) -> list[int]:
    """Each step's update equals ``-lr x`` the gradient of its window's loss taken as one batch; returns
    the windows' sizes in micro-batches (rank 0)."""
    weights = records[0]["weights"]
    steps = records[0]["global_step"]
    assert len(weights) == steps + 1
    for record in records:
        assert record["global_step"] == record["estimated_stepping_batches"] == steps
        if record["engine_global_steps"] is not None:  # DeepSpeed stepped exactly as often
            assert record["engine_global_steps"] == steps
    reference = model_with(weights[0]).eval()
    sizes = []
    for step in range(steps):
        window = [batch for record in records for s, batch in record["batches"] if s == step]
        sizes.append(sum(s == step for s, _ in records[0]["batches"]))
        assert len({int(b["window_rows"]) for b in window}) == 1  # one window count in all its micro-batches
        model = model_with(weights[step])
        window_loss(model, reference, window).backward()
        grads = dict(model.named_parameters())
        worst, scale = 0.0, 0.0
        for name, before in weights[step].items():
            expected = -LR * grads[name].grad if grads[name].grad is not None else torch.zeros_like(before)
            actual = weights[step + 1][name] - before
            worst = max(worst, float((actual - expected).abs().max()))
            scale = max(scale, float(expected.abs().max()))
        assert scale > 1e-3, f"step {step}: nothing moved"
        assert worst <= 1e-4 * scale, f"step {step} ({sizes[-1]} micro-batches): update off by {worst:.3g} of {scale:.3g}"
    return sizes


def check_every_pair_trains_once_per_epoch(records: list[dict], pairs: int, steps_per_epoch: int) -> None:
    for epoch in range(2):
        seen = [int(i) for record in records for s, batch in record["batches"]
                if epoch * steps_per_epoch <= s < (epoch + 1) * steps_per_epoch for i in batch["index"]]
        assert sorted(seen) == list(range(pairs)), epoch


WINDOWS = [2, 2, 1, 2, 2, 1]  # micro-batches per optimizer step: 5 per epoch, accumulate 2


def test_sft_plain_every_row_trains_and_the_short_window_is_its_own_mean(tmp_path, hf_cache):
    records = run_plain(tmp_path, hf_cache, *SFT)
    assert check_every_step_is_its_window(records, sft_window_loss) == WINDOWS


def test_dpo_plain_short_window_is_the_mean_over_its_own_pairs(tmp_path, hf_cache):
    records = run_plain(tmp_path, hf_cache, *DPO)
    assert check_every_step_is_its_window(records, dpo_window_loss) == WINDOWS
    check_every_pair_trains_once_per_epoch(records, 20, 3)


def test_sft_zero3_two_ranks_windows_align_with_the_epochs(tmp_path):
    records = run_deepspeed(tmp_path, *SFT, devices=2)
    assert check_every_step_is_its_window(records, sft_window_loss) == WINDOWS


def test_dpo_zero3_two_ranks_windows_align_with_the_epochs(tmp_path):
    records = run_deepspeed(tmp_path, *DPO, devices=2)
    assert check_every_step_is_its_window(records, dpo_window_loss) == WINDOWS
    check_every_pair_trains_once_per_epoch(records, 20, 3)
