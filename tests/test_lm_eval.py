"""lm-eval-harness on an export as it is: its Python API, a local multiple-choice task written from the embedded
facts (``data_files``, no hub data set), the ``hf`` model on the export folder, with every network connection
refused. Each choice's log-likelihood must equal zephyr_lit's own log-prob of the same completion."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_config
from zephyr_lit.assets import asset_path
from zephyr_lit.data.preference import split_prompt_completion
from zephyr_lit.data.tokenize import IGNORE_INDEX
from zephyr_lit.logprobs import sequence_logprobs
from zephyr_lit.models import ModelSpec, build_model, load_tokenizer

pytestmark = pytest.mark.slow

TASK = "zephyr_capitals"
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


def write_task(folder: Path, questions: int = 4) -> list[dict]:
    """A multiple-choice task over the first embedded checkable facts: each question's choices are the
    answers of all of them (the right one at ``gold``). Returns the rows."""
    facts = [json.loads(line) for line in Path(asset_path("data/ultrachat_tiny/exact_match.jsonl")).read_text()
             .splitlines()[:questions]]
    choices = [fact["answer"] for fact in facts]
    rows = [{"question": fact["messages"][-1]["content"], "choices": choices, "gold": i}
            for i, fact in enumerate(facts)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "capitals.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=folder / "capitals.jsonl"))
    return rows


@pytest.fixture(scope="module")
def dsft_export(tmp_path_factory, hf_cache) -> Path:
    """A short embedded dSFT run's export."""
    from zephyr_lit.run import train

    root = tmp_path_factory.mktemp("dsft")
    train(compose_config([f"paths.root={root}", f"paths.output_dir={root / 'run'}", f"data.cache_dir={hf_cache}",
                          "logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                          "data.max_train_samples=64", "data.max_eval_samples=8", "trainer.max_steps=8",
                          "data.exact_match_path=null", "callbacks.generations=null"]), update_latest=False)
    return root / "run" / "model"


@pytest.fixture
def offline(monkeypatch):
    """No network: hub lookups off, and any internet connection attempt raises."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    real_connect = socket.socket.connect

    def refuse(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network access during an offline test: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", refuse)


def own_logprob(model, tokenizer, question: str, answer: str) -> float:
    """log p(answer | the question as a chat prompt) with zephyr_lit's pair tokenisation and log-probs.
    lm-eval moves the context's trailing whitespace into the continuation (here the ``\\n`` after
    ``<|assistant|>``), so its number includes that token's log-prob: the same for every choice."""
    prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                add_generation_prompt=True)
    context = prompt_text.rstrip()
    prompt, completion = split_prompt_completion(context, prompt_text[len(context):] + answer, tokenizer)
    ids = torch.tensor([prompt + completion])  # (1, T)
    labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + completion])  # (1, T)
    with torch.no_grad():
        return sequence_logprobs(model(ids).logits, labels).item()


def test_lm_eval_scores_the_export_offline_as_zephyr_lit_does(tmp_path, dsft_export, offline):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the `eval` extra")  # here: a slow import
    from lm_eval.tasks import TaskManager

    rows = write_task(tmp_path / "tasks")
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(dsft_export), "dtype": "float32"}, tasks=[TASK],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
        apply_chat_template=True, device="cpu", batch_size=4, log_samples=True,
    )
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(rows) == 4
    spec = ModelSpec(name_or_path=str(dsft_export))
    model, tokenizer = build_model(spec).eval(), load_tokenizer(spec)
    hits = 0
    for sample, row in zip(samples, rows):
        theirs = [loglikelihood for loglikelihood, _ in sample["filtered_resps"]]
        ours = [own_logprob(model, tokenizer, row["question"], choice) for choice in row["choices"]]
        assert theirs == pytest.approx(ours, rel=1e-4, abs=1e-4)
        hits += max(range(len(ours)), key=ours.__getitem__) == row["gold"]
    assert out["results"][TASK]["acc,none"] == pytest.approx(hits / len(rows))
