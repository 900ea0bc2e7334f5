"""The CSV logger's fixed file, the atomic export and the latest pointer."""

import csv
import os

import pytest
from transformers import MistralConfig, MistralForCausalLM

from zephyr_lit.export import export_model, point_latest
from zephyr_lit.loggers import CSVMetricsLogger


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

    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_model(model, tokenizer, tmp_path / "model")
    assert sorted(os.listdir(target)) == before  # the earlier export is untouched


def test_latest_pointer_moves_to_the_newest_run(tmp_path):
    first, second = tmp_path / "dsft" / "run1", tmp_path / "dsft" / "run2"
    first.mkdir(parents=True)
    second.mkdir()
    link = tmp_path / "dsft" / "latest"
    point_latest(link, first)
    point_latest(link, second)
    assert link.is_symlink() and link.resolve() == second.resolve()
    assert os.readlink(link) == "run2"  # relative: the outputs folder can be moved
