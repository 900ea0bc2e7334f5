"""The reference log-prob cache: its key, its precision, its checked fill."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from zephyr_lit.assets import TINY_MODEL, asset_path
from zephyr_lit.export import export_model
from zephyr_lit.models import ModelSpec, build_model, load_tokenizer
from zephyr_lit.reference import ReferenceCache, reference_pass
from zephyr_lit.run import prepare_run

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def key_of(spec: ModelSpec, fingerprint: str = "data", precision: str = "bf16-mixed",
           dtype: torch.dtype = torch.float32) -> str:
    return ReferenceCache(spec, SimpleNamespace(fingerprint=fingerprint), False, "unused").key(precision, dtype)


def test_the_key_follows_the_resolved_hub_commit(tmp_path, monkeypatch):
    """A fake local HF cache: ``refs/main`` names the commit a floating ``main`` was downloaded at."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    spec = ModelSpec("org/model")
    (refs / "main").write_text(COMMIT_A)
    first = key_of(spec)
    assert key_of(spec) == first  # same commit, same key
    (refs / "main").write_text(COMMIT_B)  # main moved on
    assert key_of(spec) != first
    assert key_of(ModelSpec("org/model", revision=COMMIT_B)) == key_of(spec)  # the commit itself, same key
    (refs / "main").unlink()  # never downloaded: never reused
    assert key_of(spec) != key_of(spec)


def test_the_key_changes_with_precision_cast_seed_and_data():
    spec = ModelSpec(asset_path(TINY_MODEL), random_init=True, init_seed=1)
    base = key_of(spec)
    assert key_of(spec, precision="32-true") != base
    assert key_of(spec, dtype=torch.bfloat16) != base  # weights cast by the strategy (DeepSpeed under bf16)
    assert key_of(ModelSpec(asset_path(TINY_MODEL), random_init=True, init_seed=2)) != base
    assert key_of(spec, fingerprint="other data") != base
    assert key_of(ModelSpec(asset_path(TINY_MODEL), random_init=True, init_seed=1)) == base


def test_truncation_changes_the_data_fingerprint(make_cfg):
    fingerprints = []
    for prompt in (32, 64):
        cfg = make_cfg("+experiment=ddpo", f"model.name_or_path={asset_path(TINY_MODEL)}", "model.random_init=true",
                       "data.max_train_samples=32", "data.max_eval_samples=8",
                       f"data.max_prompt_length={prompt}", "data.max_length=96")
        datamodule = instantiate(cfg.data)
        datamodule.prepare(load_tokenizer(instantiate(cfg.model)))
        fingerprints.append(datamodule.fingerprint)
    assert fingerprints[0] != fingerprints[1]


class FakeLoader(list):
    def __init__(self, batches, size):
        super().__init__(batches)
        self.dataset = SimpleNamespace(size=size)


def fake_module():
    return SimpleNamespace(
        trainer=SimpleNamespace(precision_plugin=SimpleNamespace(train_step_context=contextlib.nullcontext)),
        device=torch.device("cpu"),
        all_gather=lambda t: t,
        reference_logps=lambda batch, split: torch.cat([-batch["index"].float(), -10 - batch["index"].float()]),
    )


def test_a_row_the_pass_left_out_is_an_error_naming_it():
    batches = [{"index": torch.tensor([0, 1])}, {"index": torch.tensor([3])}]  # row 2 never computed
    with pytest.raises(RuntimeError, match=r"split 'val': 1 of 4 pairs have no value \(rows 2\)"):
        reference_pass(fake_module(), FakeLoader(batches, size=4), "val")
    chosen, rejected = reference_pass(fake_module(), FakeLoader([*batches, {"index": torch.tensor([2])}], 4), "val")
    assert chosen.tolist() == [0, -1, -2, -3] and rejected.tolist() == [-10, -11, -12, -13]


@pytest.fixture(scope="module")
def start_model(tmp_path_factory):
    spec = ModelSpec(name_or_path=asset_path(TINY_MODEL), random_init=True, init_seed=5)
    return str(export_model(build_model(spec), load_tokenizer(spec), tmp_path_factory.mktemp("ref") / "model"))


def precomputed(make_cfg, start_model, tmp_path: Path, precision: str, name: str):
    run = prepare_run(make_cfg("+experiment=ddpo", f"model.name_or_path={start_model}", "dpo.ref.precompute=true",
                               f"dpo.ref.cache_dir={tmp_path / 'cache'}", f"trainer.precision={precision}",
                               "trainer.max_steps=1", "dpo.rpo_alpha=null", "data.exact_match_path=null",
                               output_dir=tmp_path / name))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return run


def test_bf16_mixed_precompute_equals_the_online_pass(make_cfg, start_model, tmp_path):
    """Before the first step policy = reference: with the cache filled in the same bf16 autocast as the
    policy's pass, every validation reward is 0 (up to float rounding). A cache filled in fp32 differs
    from it by the bf16 rounding of ~100-nat log-probs, far more than that tolerance."""
    bf16 = precomputed(make_cfg, start_model, tmp_path, "bf16-mixed", "bf16")
    initial = next(c for c in bf16.trainer.callbacks if hasattr(c, "initial_metrics")).initial_metrics
    for name in ("val/rewards/chosen", "val/rewards/rejected", "val/rewards/margins"):
        assert initial[name] == pytest.approx(0.0, abs=1e-5), name
    fp32 = precomputed(make_cfg, start_model, tmp_path, "32-true", "fp32")
    assert len({p.parent for p in (tmp_path / "cache").rglob("val.pt")}) == 2  # precision is in the key
    gap = (bf16.module.cached_logps["val"][0] - fp32.module.cached_logps["val"][0]).abs().max()
    assert gap > 1e-2, gap  # what an fp32 cache would have put into every bf16 reward (x beta)
