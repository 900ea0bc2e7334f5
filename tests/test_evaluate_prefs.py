"""``task=prefs``: DPO's metrics of a policy against a reference on a preference split, checked against the
DPO formulas applied by hand to log-probs from a plain forward pass, and against a dDPO run's own val metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import compose_config
from zephyr_lit.assets import TINY_MODEL, asset_path
from zephyr_lit.errors import ConfigError
from zephyr_lit.evaluate.app import evaluate
from zephyr_lit.export import export_model
from zephyr_lit.models import ModelSpec, build_model, load_tokenizer

HEADLINE = {"rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "loss"}


def prefs_cfg(out: Path, hf_cache: Path, *overrides: str):
    return compose_config(["task=prefs", f"output_dir={out}", f"data.cache_dir={hf_cache}", *overrides],
                          config_name="evaluate")


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[str, str]:
    """Two different tiny models (random inits 1 and 2) saved as exports: a policy and a reference."""
    folders = []
    for seed in (1, 2):
        spec = ModelSpec(name_or_path=asset_path(TINY_MODEL), random_init=True, init_seed=seed)
        folder = tmp_path_factory.mktemp(f"seed{seed}") / "model"
        folders.append(str(export_model(build_model(spec), load_tokenizer(spec), folder)))
    return folders[0], folders[1]


def naive_logps(model, prompt: list[int], completion: list[int]) -> float:
    """Sum of log p(completion token | everything before it): one unpadded forward, full logits."""
    ids = torch.tensor([prompt + completion])  # (1, T)
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)  # (T-1, V): predicts tokens 1..T-1
    token_logps = logp.gather(1, ids[0, 1:, None])[:, 0]  # (T-1,)
    return token_logps[len(prompt) - 1 :].sum().item()


def test_prefs_equals_the_dpo_formulas_on_log_probs_of_a_plain_forward_pass(tmp_path, hf_cache, two_models):
    """6 pairs in batches of 4 (the last one padded); cDPO: ``loss = -(1 - e) log s(b m) - e log s(-b m)`` with
    ``m = (pi_c - ref_c) - (pi_r - ref_r)``; rewards ``b (pi - ref)``; accuracy: chosen reward above rejected."""
    policy_path, reference_path = two_models
    beta, smoothing = 0.5, 0.1
    cfg = prefs_cfg(tmp_path / "out", hf_cache, f"model_path={policy_path}", f"reference_path={reference_path}",
                    "data.max_eval_samples=6", "data.eval_batch_size=4", "data.train_split=never_read",
                    f"dpo.beta={beta}", f"dpo.label_smoothing={smoothing}")
    metrics = evaluate(cfg)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert HEADLINE <= set(written) and all(written[k] == metrics[k] for k in HEADLINE)
    assert written["setup"]["data"]["pairs"] == 6 and written["setup"]["reference_path"] == reference_path

    from zephyr_lit.data.preference import PreferenceDataModule

    data = PreferenceDataModule(path=asset_path("data/ultrafeedback_tiny"), max_length=256, max_prompt_length=128,
                                max_eval_samples=6, cache_dir=str(hf_cache))
    tokenizer = load_tokenizer(ModelSpec(name_or_path=policy_path))
    data.use_tokenizer(tokenizer)
    pairs = data.build(data.load("test_prefs", 6), tokenizer)
    models = [build_model(ModelSpec(name_or_path=p)).eval() for p in (policy_path, reference_path)]
    rewards = {"chosen": [], "rejected": []}
    for pair in pairs:
        for side in rewards:
            pi, ref = (naive_logps(m, pair["prompt_input_ids"], pair[f"{side}_input_ids"]) for m in models)
            rewards[side].append(beta * (pi - ref))
    margins = [c - r for c, r in zip(rewards["chosen"], rewards["rejected"])]
    losses = [-(1 - smoothing) * math.log(1 / (1 + math.exp(-m))) - smoothing * math.log(1 / (1 + math.exp(m)))
              for m in margins]  # beta is inside the rewards already
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    expected = {"rewards/chosen": mean(rewards["chosen"]), "rewards/rejected": mean(rewards["rejected"]),
                "rewards/margins": mean(margins), "loss": mean(losses),
                "rewards/accuracies": mean([float(m > 0) for m in margins])}
    assert 0 < expected["rewards/accuracies"] < 1 and abs(expected["rewards/margins"]) > 1e-3  # a real comparison
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_every_config_problem_is_reported_at_once_before_any_model_loads(tmp_path, hf_cache, monkeypatch):
    import zephyr_lit.evaluate.prefs as prefs

    monkeypatch.setattr(prefs, "build_model", lambda *a, **k: pytest.fail("a model was loaded"))
    cfg = prefs_cfg(tmp_path, hf_cache, f"model_path={tmp_path}", "dpo.beta=0", "data.max_prompt_length=300",
                    "prefs.dtype=float8", "prefs.length_groups=0")
    with pytest.raises(ConfigError) as error:
        evaluate(cfg)
    message = str(error.value)
    for part in ("model_path=", "reference_path is not set", "beta must be > 0", "data.max_prompt_length=300",
                 "prefs.dtype=float8", "prefs.length_groups=0"):
        assert part in message, part
    sft = prefs_cfg(tmp_path, hf_cache, "data=ultrachat_tiny", f"reference_path={tmp_path}")
    with pytest.raises(ConfigError, match="reference_path=.*no config.json.*task=prefs needs preference data"):
        evaluate(sft)


# ---- slow: a dDPO run's final val metrics, reproduced from its export ---------------------------
RUN = ["logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
       "data.exact_match_path=null", "callbacks.generations=null"]
VAL_PAIRS = 37  # odd, and not a multiple of the batch: the means must cover every pair once


@pytest.fixture(scope="module")
def ddpo_run(tmp_path_factory, hf_cache) -> tuple[Path, Path, dict]:
    """A short dSFT run, then a short dDPO run from its export (as the two commands do, with fewer steps)."""
    from zephyr_lit.run import train

    root = tmp_path_factory.mktemp("runs")
    common = [f"paths.root={root}", f"data.cache_dir={hf_cache}", *RUN]
    dsft, ddpo = root / "dsft" / "run", root / "ddpo" / "run"
    train(compose_config([*common, "+experiment=dsft", f"paths.output_dir={dsft}", "data.max_train_samples=64",
                          "data.max_eval_samples=8", "trainer.max_steps=4"]), update_latest=False)
    summary = train(compose_config([*common, "+experiment=ddpo", f"paths.output_dir={ddpo}",
                                    f"model.name_or_path={dsft / 'model'}", "data.max_train_samples=64",
                                    f"data.max_eval_samples={VAL_PAIRS}", "data.batch_size=8",
                                    "data.eval_batch_size=16", "optim.lr=1e-3", "trainer.max_steps=6"]),
                    update_latest=False)
    return dsft, ddpo, summary


@pytest.mark.slow
def test_prefs_reproduces_the_final_val_metrics_of_a_ddpo_run(tmp_path, hf_cache, ddpo_run):
    dsft, ddpo, summary = ddpo_run
    cfg = prefs_cfg(tmp_path, hf_cache, f"model_path={ddpo}", f"reference_path={dsft}",  # run folders: model/ inside
                    f"data.max_eval_samples={VAL_PAIRS}", "dpo.rpo_alpha=1.0")  # as conf/experiment/ddpo.yaml
    metrics = evaluate(cfg)
    trained = {k.removeprefix("val/"): v for k, v in summary["metrics"].items()}
    assert summary["global_step"] == 6 and 0 < trained["rewards/accuracies"] < 1 and trained["rewards/margins"] > 0
    assert metrics["rewards/accuracies"] == pytest.approx(trained["rewards/accuracies"], abs=0.01)
    assert metrics["rewards/margins"] == pytest.approx(trained["rewards/margins"], rel=0.02)
    for name in (*HEADLINE, "logps/chosen", "logits/rejected", "nll_loss"):  # in fact the same to float precision
        assert metrics[name] == pytest.approx(trained[name], rel=1e-5, abs=1e-7), name
