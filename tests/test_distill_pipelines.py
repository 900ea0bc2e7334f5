"""The pipelines: ``+pipeline=embedded`` writes sft/ and prefs/ that the trainer reads; ``+pipeline=zephyr``
is the paper's recipe as a config (what ``--cfg job`` prints is pinned here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import compose_config
from zephyr_lit.data.load import load_split
from zephyr_lit.distill.app import distill
from zephyr_lit.distill.store import split_path

ROOT = Path(__file__).resolve().parents[1]


def test_the_embedded_pipeline_chains_dialogues_completions_rate_and_binarize(tmp_path, hf_cache):
    out = tmp_path / "run"
    cfg = compose_config([f"output_dir={out}", f"cache_dir={hf_cache}", "+pipeline=embedded", "input_split=test_sft",
                          "dialogues.test_size=20", "binarize.test_size=20"], "distill")
    results = distill(cfg)
    assert list(results) == ["dialogues", "completions", "rate", "binarize"]
    dialogues = results["dialogues"]["dialogues"]
    assert dialogues == results["dialogues"]["seeds"] > 150 and results["dialogues"]["dropped"] == 0
    # completions answered the prompts of sft's train_gen + test_gen: every dialogue's opening, 4 answers each
    assert results["completions"]["prompts"] == dialogues and results["completions"]["completions"] == 4 * dialogues
    assert results["binarize"]["pairs"] == dialogues and results["binarize"]["test"] == 20
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["completions", "prefs", "rated", "sft"]
    gen = [json.loads(line) for split in ("train_gen", "test_gen")
           for line in split_path(out / "sft", split).read_text().splitlines()]
    completions = [json.loads(line) for line in split_path(out / "completions", "train").read_text().splitlines()]
    assert sorted(json.dumps(r["messages"]) for r in completions) == sorted(json.dumps(r["messages"]) for r in gen)
    for folder, split in (("sft", "train_sft"), ("sft", "test_sft"), ("prefs", "train_prefs"), ("prefs", "test_prefs")):
        assert load_split(str(out / folder), split, str(hf_cache)).dataset.num_rows > 0  # the trainer's reader
    pair = json.loads(split_path(out / "prefs", "train_prefs").read_text().splitlines()[0])
    assert pair["chosen"][:-1] == pair["rejected"][:-1] and pair["score_chosen"] >= pair["score_rejected"]


def test_cfg_job_of_the_zephyr_pipeline_is_the_papers_recipe(monkeypatch):
    """What ``python -m zephyr_lit.distill +pipeline=zephyr --cfg job`` prints."""
    result = subprocess.run([sys.executable, "-m", "zephyr_lit.distill", "+pipeline=zephyr", "--cfg", "job"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    job = OmegaConf.create(result.stdout)
    assert list(job.pipeline.stages) == ["dialogues", "completions", "rate", "binarize"]
    assert (job.input, list(job.input_split)) == ("HuggingFaceH4/ultrachat_200k", ["train_gen", "test_gen"])
    assert OmegaConf.to_container(job.pipeline.inputs) == {"completions": {"input": "openbmb/UltraFeedback", "split": "train"}}
    openai = "zephyr_lit.distill.openai_backend.OpenAIBackend"
    for side in ("user", "assistant"):  # UltraChat: ChatGPT on both sides
        assert (job.dialogues[side].backend._target_, job.dialogues[side].backend.model) == (openai, "gpt-3.5-turbo")
    assert list(job.dialogues.turns) == [3, 7] and job.dialogues.test_size == 23110
    assert job.completions.n == 4 and len(job.completions.pool) >= 4
    assert all(member._target_ == openai for member in job.completions.pool)
    assert len({member.model for member in job.completions.pool}) == len(job.completions.pool)
    assert (job.judge.backend._target_, job.judge.backend.model, job.judge.temperature) == (openai, "gpt-4-0613", 0.0)
    assert list(job.rate.aspects) == ["instruction_following", "honesty", "truthfulness", "helpfulness"]
    assert (job.binarize.score, job.binarize.rejected, job.binarize.ties, job.binarize.test_size) == ("mean", "random", "keep", 2000)
    assert job.distributed.devices == 1
    # every backend builds (nothing is contacted before the first request)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-a-real-key")
    for node in (job.dialogues.user.backend, job.dialogues.assistant.backend, job.judge.backend, *job.completions.pool):
        assert type(instantiate(node)).__name__ == "OpenAIBackend"
