"""The CSV logger's fixed file, the atomic export (for inference: KV cache on) and the latest pointer."""

import csv
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from zephyr_lit.export import export_model, point_latest
from zephyr_lit.loggers import CSVMetricsLogger
from zephyr_lit.run import train


def read(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_appends_and_widens_the_header(tmp_path):
    path = tmp_path / "metrics.csv"
    CSVMetricsLogger(str(path)).log_metrics({"val/loss": 2.0}, step=0)
    resumed = CSVMetricsLogger(str(path))  # a resumed run: a new logger on the same file
    resumed.log_metrics({"val/loss": 1.5}, step=5)
    resumed.log_metrics({"train/loss": 1.7, "train/lr": 0.1}, step=6)
    rows = read(path)
    assert [r["step"] for r in rows] == ["0", "5", "6"]
    assert [r["val/loss"] for r in rows] == ["2.0", "1.5", ""]
    assert rows[2]["train/lr"] == "0.1"
    assert list(tmp_path.iterdir()) == [path]  # no version_N folders, no temp files left


def test_export_replaces_an_old_export_only_when_complete(tmp_path, monkeypatch):
    from zephyr_lit.assets import TINY_MODEL, asset_path
    from zephyr_lit.models import ModelSpec, load_tokenizer

    tokenizer = load_tokenizer(ModelSpec(name_or_path=asset_path(TINY_MODEL)))
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    target = export_model(model, tokenizer, tmp_path / "model")
    assert (target / "model.safetensors").exists() and (target / "tokenizer.json").exists()
    before = sorted(os.listdir(target))

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    model.config.use_cache = False  # as build_model leaves it with gradient checkpointing
    generation_config = model.generation_config
    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_model(model, tokenizer, tmp_path / "model")
    assert sorted(os.listdir(target)) == before  # the earlier export is untouched
    # A failed export leaves the live model's configs as they were, too.
    assert model.config.use_cache is False and model.generation_config is generation_config


def test_export_of_a_checkpointed_run_generates_with_the_kv_cache(make_cfg):
    """Gradient checkpointing turns the live cache off; the export turns it back on, in both files.
    (Without it: config.json says use_cache false and pipeline() recomputes the prefix per token.)"""
    # No exact-match generation and a small validation set: only the export is under test.
    summary = train(make_cfg("model.gradient_checkpointing=true", "trainer.max_steps=2", "data.exact_match_path=null",
                             "data.max_eval_samples=16"))
    export = summary["export_dir"]
    for name in ("config.json", "generation_config.json"):
        with open(os.path.join(export, name)) as handle:
            assert json.load(handle)["use_cache"] is True, name
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.use_cache and model.generation_config.use_cache
    prompt = torch.tensor([[1, 388, 259, 2]])  # BOS and the empty system turn of the chat template
    output = model.generate(prompt, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert output.cache is not None and output.cache.get_seq_length() >= prompt.shape[1]  # the prefix was cached


def test_export_leaves_the_live_model_as_it_was(tmp_path):
    from zephyr_lit.assets import TINY_MODEL, asset_path
    from zephyr_lit.models import ModelSpec, build_model, load_tokenizer

    spec = ModelSpec(name_or_path=asset_path(TINY_MODEL), random_init=True, gradient_checkpointing=True)
    tokenizer, model = load_tokenizer(spec), build_model(spec)
    generation = model.generation_config.to_dict()
    export_model(model, tokenizer, tmp_path / "model")
    assert model.config.use_cache is False and model.is_activation_checkpointing and model.training
    assert model.generation_config.to_dict() == generation
    with open(tmp_path / "model" / "generation_config.json") as handle:
        saved = json.load(handle)
    assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (1, 2, 2)


def test_latest_pointer_moves_to_the_newest_run(tmp_path):
    first, second = tmp_path / "dsft" / "run1", tmp_path / "dsft" / "run2"
    first.mkdir(parents=True)
    second.mkdir()
    link = tmp_path / "dsft" / "latest"
    point_latest(link, first)
    point_latest(link, second)
    assert link.is_symlink() and link.resolve() == second.resolve()
    assert os.readlink(link) == "run2"  # relative: the outputs folder can be moved
