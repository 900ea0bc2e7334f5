"""DPOModule on the embedded preference data: the frozen reference stays frozen, in eval mode and in
sync; validation before training sees policy == reference; the log-prob cache equals the online pass."""

from __future__ import annotations

import csv
import gc
import math
import weakref

import pytest
import torch

import zephyr_lit.reference as reference_module
from zephyr_lit.assets import TINY_MODEL, asset_path
from zephyr_lit.export import export_model
from zephyr_lit.metric_sums import MetricSums
from zephyr_lit.models import ModelSpec, build_model, load_tokenizer
from zephyr_lit.reference import mixup_
from zephyr_lit.run import prepare_run, train


@pytest.fixture(scope="module")
def start_model(tmp_path_factory):
    """A stand-in for the dSFT export: the tiny model, random init, saved as a Hugging Face folder."""
    spec = ModelSpec(name_or_path=asset_path(TINY_MODEL), random_init=True)
    folder = tmp_path_factory.mktemp("sft") / "model"
    return str(export_model(build_model(spec), load_tokenizer(spec), folder))


def ddpo_cfg(make_cfg, start_model, *overrides, **kwargs):
    return make_cfg("+experiment=ddpo", f"model.name_or_path={start_model}", "optim.lr=1e-3", *overrides, **kwargs)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_reference_is_frozen_in_eval_and_never_trained(make_cfg, start_model):
    run = prepare_run(ddpo_cfg(make_cfg, start_model, "trainer.max_steps=6"))
    run.module.configure_model()
    before = state(run.module.reference)
    policy_before = state(run.module.policy)
    assert all(torch.equal(before[k], policy_before[k]) for k in before)  # same weights at start
    run.trainer.fit(run.module, datamodule=run.datamodule)
    reference, policy = run.module.reference, run.module.policy
    assert not reference.training and policy.training  # eval even after the validation loops
    assert not any(p.requires_grad for p in reference.parameters())
    optimized = {id(p) for group in run.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in policy.parameters()}
    after = state(reference)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert any(not torch.equal(policy_before[k], v) for k, v in state(policy).items())
    assert reference.dtype == policy.dtype and reference.device == policy.device


def test_validation_before_training_is_ln2_with_zero_rewards(make_cfg, start_model, tmp_path):
    train(ddpo_cfg(make_cfg, start_model, "trainer.max_steps=2", "dpo.rpo_alpha=null"))  # the plain DPO loss
    with open(tmp_path / "outputs" / "run" / "metrics.csv", newline="") as handle:
        first = next(r for r in csv.DictReader(handle) if r.get("val/loss"))
    assert first["step"] == "0"
    assert float(first["val/loss"]) == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert float(first[f"val/{name}"]) == pytest.approx(0.0, abs=1e-6)
    assert float(first["val/rewards/accuracies"]) == 0.0  # ties are not wins
    assert float(first["val/logps/chosen"]) < 0 and first["val/logits/chosen"] != ""


def test_precomputed_reference_logps_equal_the_online_pass_and_are_reused(make_cfg, start_model, tmp_path, monkeypatch):
    cache = tmp_path / "ref-cache"
    run = prepare_run(ddpo_cfg(make_cfg, start_model, "trainer.max_steps=2", "dpo.ref.precompute=true",
                               f"dpo.ref.cache_dir={cache}"))
    run.module.configure_model()  # fit builds nothing more (idempotent)
    reference_param = weakref.ref(next(run.module.reference.parameters()))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.module.reference is None  # freed
    gc.collect()
    assert reference_param() is None  # and nothing else holds its weights
    cached_chosen, cached_rejected = run.module.cached_logps["val"]
    files = sorted(p.name for p in cache.rglob("*.pt"))
    assert files == ["train.pt", "val.pt"]

    online = prepare_run(ddpo_cfg(make_cfg, start_model, "trainer.max_steps=2", output_dir=tmp_path / "online"))
    online.module.configure_model()
    online.module.reference.eval()
    for batch in online.datamodule.val_dataloader():
        size = batch["index"].numel()
        logps = online.module.reference_logps(batch, split="val")
        torch.testing.assert_close(cached_chosen[batch["index"]], logps[:size], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(cached_rejected[batch["index"]], logps[size:], atol=1e-5, rtol=1e-6)

    def refuse(*args, **kwargs):
        raise AssertionError("reference log-probs recomputed despite the cache")

    monkeypatch.setattr(reference_module, "reference_pass", refuse)
    again = prepare_run(ddpo_cfg(make_cfg, start_model, "trainer.max_steps=2", "dpo.ref.precompute=true",
                                 f"dpo.ref.cache_dir={cache}", output_dir=tmp_path / "again"))
    again.trainer.fit(again.module, datamodule=again.datamodule)
    torch.testing.assert_close(again.module.cached_logps["val"][0], cached_chosen)


def test_mixup_by_hand():
    reference, policy = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([[1.0, 2.0]]))
        policy.weight.copy_(torch.tensor([[3.0, -2.0]]))
    mixup_(reference, policy, alpha=0.25)  # 0.25 * policy + 0.75 * reference
    assert reference.weight.tolist() == [[1.5, 1.0]]
    assert policy.weight.tolist() == [[3.0, -2.0]]


def test_sync_moves_the_reference_and_checkpoints_carry_it_only_then(make_cfg, start_model, tmp_path):
    synced = prepare_run(ddpo_cfg(make_cfg, start_model, "trainer.max_steps=4", "dpo.ref.sync_steps=2",
                                  output_dir=tmp_path / "synced"))
    synced.module.configure_model()
    start = state(synced.module.reference)
    synced.trainer.fit(synced.module, datamodule=synced.datamodule)
    moved = state(synced.module.reference)
    assert any(not torch.equal(start[k], moved[k]) for k in start)
    keys = torch.load(tmp_path / "synced" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"].keys()
    assert any(k.startswith("reference.") for k in keys)

    plain = prepare_run(ddpo_cfg(make_cfg, start_model, "trainer.max_steps=2", output_dir=tmp_path / "plain"))
    plain.trainer.fit(plain.module, datamodule=plain.datamodule)
    ckpt = tmp_path / "plain" / "checkpoints" / "last.ckpt"
    assert not any(k.startswith("reference.") for k in torch.load(ckpt, weights_only=False)["state_dict"])
    resumed = prepare_run(ddpo_cfg(make_cfg, start_model, "trainer.max_steps=3", output_dir=tmp_path / "plain"))
    resumed.trainer.fit(resumed.module, datamodule=resumed.datamodule, ckpt_path=str(ckpt))
    assert all(torch.equal(start[k], v) for k, v in state(resumed.module.reference).items())  # rebuilt


def test_precompute_with_sync_is_refused(make_cfg, start_model):
    from zephyr_lit.errors import ConfigError

    with pytest.raises(ConfigError, match="dpo.ref.precompute=true with dpo.ref.sync_steps set"):
        prepare_run(ddpo_cfg(make_cfg, start_model, "dpo.ref.precompute=true", "dpo.ref.sync_steps=4"))


@pytest.mark.parametrize("override, message", [("dpo.beta=0", "beta must be > 0"),
                                               ("dpo.loss_type=kto", "unknown DPO loss_type 'kto'"),
                                               ("dpo.label_smoothing=0.5", r"label_smoothing must lie in \[0, 0.5\)")])
def test_bad_dpo_settings(make_cfg, start_model, override, message):
    from zephyr_lit.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        prepare_run(ddpo_cfg(make_cfg, start_model, override))


def test_missing_dsft_model_says_what_to_run(make_cfg, tmp_path):
    from zephyr_lit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"no model there \(run `python train.py \+experiment=dsft` first"):
        prepare_run(make_cfg("+experiment=ddpo"))


def test_rpo_adds_alpha_times_the_chosen_token_mean_nll(make_cfg, start_model):
    import torch.nn.functional as F

    plain = prepare_run(ddpo_cfg(make_cfg, start_model, "dpo.rpo_alpha=null"))
    rpo = prepare_run(ddpo_cfg(make_cfg, start_model, "dpo.rpo_alpha=0.5"))
    for run in (plain, rpo):
        run.module.configure_model()
        run.module.log = lambda *args, **kwargs: None  # no trainer attached: skip logging
    batch = next(iter(plain.datamodule.val_dataloader()))
    size = batch["index"].numel()
    chosen_tokens = int((batch["labels"][:size] != -100).sum())
    losses, shares = {}, {}
    with torch.no_grad():
        for name, run in (("base", plain), ("rpo", rpo)):
            sums = MetricSums()
            run.module._step(batch, "val", sums)
            means = {k: float(sums.totals[k] / sums.counts[k]) for k in sums.totals}
            losses[name] = run.module.window_metrics(means, "val")["loss"]
            # as a training micro-batch that is its own window: the share is the same loss
            window = dict(batch, window_rows=torch.tensor(size), window_tokens=torch.tensor(chosen_tokens))
            shares[name] = float(run.module._step(window, "val", MetricSums()))
        logits = rpo.module.policy(input_ids=batch["input_ids"][:size], attention_mask=batch["attention_mask"][:size]).logits
    # mean NLL over the chosen completions' tokens, straight from cross-entropy with shifted labels
    nll = float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:size, 1:].reshape(-1)))
    assert losses["rpo"] - losses["base"] == pytest.approx(0.5 * nll, abs=1e-5, rel=1e-5)
    assert shares == pytest.approx(losses, abs=1e-6, rel=1e-6)
