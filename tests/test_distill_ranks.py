"""Generation over ranks: 2 CPU processes (Fabric, gloo) write exactly the rows of 1 process, and a run
whose rank 1 is killed mid-stage, rerun with 2 processes, ends with those rows too."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.distributed.process import run_group
from zephyr_lit.distill.store import split_path

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train_sft", "test_sft", "train_gen", "test_gen")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chatty_model(tmp_path_factory) -> Path:
    """A random tiny Mistral whose generation config stops at any of the ids 100-599, so its sampled
    replies are a few tokens long and mostly end by themselves (a random model rarely emits eos)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from zephyr_lit.assets import asset_path
    from zephyr_lit.chat import ZEPHYR_CHAT_TEMPLATE

    folder = tmp_path_factory.mktemp("chatty")
    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny-mistral"))
    tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(asset_path("tiny-mistral")))
    model.generation_config.eos_token_id = list(range(100, 600))
    model.save_pretrained(folder)
    return folder


def hf_side(role: str, model: Path) -> list[str]:
    return [f"dialogues/{role}=hf", f"dialogues.{role}.backend.name_or_path={model}", f"dialogues.{role}.backend.dtype=float32",
            f"dialogues.{role}.backend.device=cpu", f"dialogues.{role}.backend.batch_size=3",
            f"dialogues.{role}.temperature=1.0", f"dialogues.{role}.max_new_tokens=12"]


def dialogues(model: Path, seeds: Path, out: Path, *extra: str, devices: int = 1):
    args = ["stage=dialogues", f"input={seeds}", f"output_dir={out}", "dialogues.turns=[1,3]", "dialogues.test_size=4",
            "dialogues.retries=1", "dialogues.chunk_size=2", *hf_side("user", model), *hf_side("assistant", model),
            f"distributed.devices={devices}", "distributed.accelerator=cpu", "distributed.timeout_s=60", *extra]
    return run_group([sys.executable, "-m", "zephyr_lit.distill", *args], timeout=300, cwd=ROOT,
                     capture_output=True, text=True)


def files(out: Path) -> dict[str, bytes]:
    return {s: split_path(out, s).read_bytes() for s in SPLITS}


def counts(out: Path) -> dict:
    body = json.loads((out / "manifest.json").read_text())
    assert body["status"] == "complete"
    return {k: v for k, v in body["counts"].items() if k not in ("resumed", "retries")}  # this run's work only


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("seeds") / "seeds.txt"
    path.write_text("\n".join(f"Question number {i}: what is {i} + {i + 2}?" for i in range(20)) + "\n")
    return path


@pytest.fixture(scope="module")
def one_process(chatty_model, seeds, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "out"
    done = dialogues(chatty_model, seeds, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_two_processes_write_exactly_the_rows_of_one(one_process, chatty_model, seeds, tmp_path):
    made = counts(one_process)
    assert made["dialogues"] >= 8 and made["dialogues"] + made["dropped"] == 20  # real, mostly kept, dialogues
    assert made["turns"] > made["dialogues"]  # some have several rounds
    out = tmp_path / "two"
    done = dialogues(chatty_model, seeds, out, devices=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert files(out) == files(one_process)
    assert counts(out) == made
    parts = {p.name: len(p.read_text().splitlines()) for p in (out / ".work").glob("records*.jsonl")}
    assert parts == {"records.jsonl": 10, "records.rank1.jsonl": 10}  # each rank wrote its own share


def test_a_killed_rank_ends_the_run_and_the_rerun_with_two_processes_ends_with_the_same_rows(
    one_process, chatty_model, seeds, tmp_path
):
    out, marker = tmp_path / "killed", tmp_path / "died"
    dying = ("dialogues.assistant.backend._target_=tests.distill.dying.DyingHF",
             "+dialogues.assistant.backend.die_at=5", f"+dialogues.assistant.backend.marker={marker}")
    first = dialogues(chatty_model, seeds, out, *dying, devices=2)
    assert marker.exists() and first.returncode != 0  # rank 1 died; rank 0 did not wait for ever
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    written = len((out / ".work" / "records.rank1.jsonl").read_text().splitlines())
    assert 0 < written < 10  # rank 1 stopped part way through its share
    again = dialogues(chatty_model, seeds, out, *dying, devices=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert files(out) == files(one_process)
    assert counts(out) == counts(one_process)
