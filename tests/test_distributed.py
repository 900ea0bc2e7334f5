"""Two processes (DDP over gloo, on CPU) train exactly like one process with the same global batch.

Each 2-process run is the real launch path, ``torchrun --standalone --nproc-per-node 2 train.py ...``,
in a subprocess (DDP re-executes the launching command, so it cannot run inside pytest). A callback
added from the command line (``tests/distributed/rank_facts.py``) makes every rank write what it saw:
weights hashes of the trained model and of the frozen reference, its validation shard, the synced
validation metrics, its own unreduced share of them, its final weights and reference log-prob cache.
The 1-process runs go through ``zephyr_lit.run.train`` in this process, on the same composed config.

Why the comparisons are sharp:

- SGD without gradient clipping: the update is ``lr x gradient``, so a gradient off by any factor
  shows up in the weights. (AdamW is nearly invariant to the gradient's scale, and clipping by norm
  rescales every large gradient to the same norm: either would hide, for example, a missing
  ``x world_size`` in ``SFTModule``'s loss, which would halve every update here; the tests check that
  the weights moved by far more than the tolerance, so half an update cannot pass. Tried once by
  patching the factor out in the ranks: the SFT test fails, weights off by up to 3e-2, tolerance 2e-6.)
- 33 validation rows: the ranks get unequal shards (17 and 16), so a mean of per-rank means, or
  rank 0's own mean, differs from the mean over the whole set; the tests check from each rank's
  unreduced share that it does, by more than the tolerance, and that the logged value is the global one.
- 2 epochs: the per-epoch reshuffle must agree too.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_config, odd_exact_match
from tests.distributed.process import run_group
from tests.distributed.train_py import max_abs_diff
from zephyr_lit.assets import TINY_MODEL, asset_path
from zephyr_lit.run import train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FACTS = "tests.distributed.rank_facts.RankFacts"
VAL_ROWS = 33  # odd: unequal shards on 2 ranks

# The comparison settings: plain SGD (no momentum), no clipping, warmup then decay, metrics every step.
SHARP = [
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "trainer.gradient_clip_val=null",
    "optim.optimizer._target_=torch.optim.SGD",
    "~optim.optimizer.betas",
    "~optim.optimizer.eps",
    "data.exact_match_path=null",
    "data.max_train_samples=32",
    f"data.max_eval_samples={VAL_ROWS}",
    "data.max_length=64",  # short sequences: the runs are about the launch and the reductions
    "model.dtype=float32",
]

WEIGHT_TOL = {"atol": 2e-6, "rtol": 1e-4}
METRIC_REL = 1e-5


def torchrun(nproc: int, overrides: list[str], log: Path) -> None:
    """``torchrun --standalone --nproc-per-node N train.py trainer.devices=N strategy=ddp ...``."""
    launcher = Path(sys.executable).with_name("torchrun")
    head = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    command = [*head, "--standalone", f"--nproc-per-node={nproc}", "train.py", "trainer.accelerator=cpu",
               f"trainer.devices={nproc}", "strategy=ddp", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    with open(log, "w") as handle:
        done = run_group(command, 300, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        pytest.fail(f"torchrun exited {done.returncode}:\n" + log.read_text()[-6000:])


def one_thread(fn, *args, **kwargs):
    """Run ``fn`` with one intra-op thread, like each torchrun rank (``OMP_NUM_THREADS=1``): on a
    shared 2-core machine several spinning threads per process make these tiny steps many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def rank_facts(folder: Path, rank: int) -> tuple[dict, dict]:
    return json.loads((folder / f"rank{rank}.json").read_text()), torch.load(folder / f"rank{rank}.pt")


def run_pair(tmp: Path, hf_cache: Path, name: str, shared: list[str], two: list[str], one: list[str]):
    """The same config twice: 2 processes (+ ``two``) by torchrun, 1 process (+ ``one``) in this process.
    The 2-process run goes first: on a fresh datasets cache its two ranks tokenise side by side."""
    runs = {}
    for label, extra in (("two", two), ("one", one)):
        out = tmp / f"{name}-{label}"
        overrides = [f"paths.root={tmp / 'outputs'}", f"paths.output_dir={out}", f"data.cache_dir={hf_cache}",
                     *SHARP, *shared, *extra,
                     f"+callbacks.rank_facts._target_={FACTS}", f"+callbacks.rank_facts.out_dir={out / 'facts'}"]
        started = time.perf_counter()
        if label == "two":
            torchrun(2, overrides, tmp / f"{name}-two.log")
        else:
            one_thread(train, compose_config(overrides), update_latest=False)
        print(f"{name}-{label}: {time.perf_counter() - started:.1f} s")
        ranks = [rank_facts(out / "facts", r) for r in range(2 if label == "two" else 1)]
        runs[label] = {"dir": out, "summary": json.loads((out / "summary.json").read_text()), "ranks": ranks,
                       "csv": read_metrics(out / "metrics.csv")}
    return runs["one"], runs["two"]


def read_metrics(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


def train_rows(rows: list[dict[str, float]]) -> dict[int, dict[str, float]]:
    """``{step: {train metric: value}}`` without throughput."""
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        metrics = {k: v for k, v in row.items() if k.startswith("train/") and k != "train/tokens_per_s"}
        if metrics:
            out.setdefault(int(row["step"]), {}).update(metrics)
    return out


def check_same_training(one: dict, two: dict, start: dict[str, torch.Tensor]) -> dict[str, float]:
    """Both ranks end on the same weights, equal to the 1-process run's; the weights really moved."""
    (facts0, out0), (facts1, out1) = two["ranks"]
    (facts_one, out_one), = one["ranks"]
    assert facts0["world_size"] == facts1["world_size"] == 2 and facts_one["world_size"] == 1
    assert facts0["start_hash"] == facts1["start_hash"] == facts_one["start_hash"]
    assert facts0["end_hash"] == facts1["end_hash"], "the ranks' weights diverged"
    assert facts0["global_step"] == facts1["global_step"] == facts_one["global_step"]
    # the same schedule: as many optimizer steps per epoch, each rank with half the micro-batches' rows
    assert facts0["estimated_stepping_batches"] == facts_one["estimated_stepping_batches"]
    diff = max_abs_diff(out0["weights"], out_one["weights"])
    moved = max_abs_diff(out_one["weights"], start)
    for key, weight in out_one["weights"].items():
        torch.testing.assert_close(out0["weights"][key], weight, **WEIGHT_TOL, msg=lambda m: f"{key}: {m}")
    # Half (or double) an update would be off by about half the movement: far outside the tolerance.
    assert moved > 1000 * diff and moved > 1e-2, (moved, diff)
    return {"max_abs_diff": diff, "moved": moved}


def check_validation(one: dict, two: dict, names: list[str]) -> dict[str, dict[str, float]]:
    """Every validation's metrics agree across ranks and with the 1-process run (whole val set), and
    the ranks' shards were unequal, with per-rank means that differ from the global mean."""
    (facts0, _), (facts1, _) = two["ranks"]
    (facts_one, _), = one["ranks"]
    assert (facts0["val_rows"], facts1["val_rows"]) == (17, 16) and facts_one["val_rows"] == VAL_ROWS
    assert facts0["val_batches"] == facts1["val_batches"]  # rank 1's shard is padded: the same collectives
    if "val_index" in facts0:  # preference rows: disjoint shards covering the split
        assert sorted(facts0["val_index"] + facts1["val_index"]) == facts_one["val_index"]
    steps = [v["step"] for v in facts_one["validations"]]
    assert [v["step"] for v in facts0["validations"]] == steps and len(steps) >= 2
    assert facts0["validations"] == facts1["validations"], "the ranks logged different (unsynced) metrics"
    assert one["summary"]["metrics"] == pytest.approx(two["summary"]["metrics"], rel=METRIC_REL)
    for with_one, with_two in zip(facts_one["validations"], facts0["validations"]):
        assert with_two["metrics"].keys() == with_one["metrics"].keys()
        assert with_two["metrics"] == pytest.approx(with_one["metrics"], rel=METRIC_REL, abs=1e-7), with_one["step"]
    # The discriminating power, from the ranks' own unreduced (sum, count) of the last validation:
    shares0, shares1 = facts0["val_shares"][-1], facts1["val_shares"][-1]
    last = facts0["validations"][-1]["metrics"]
    report = {}
    for name in names:
        if name not in shares0:  # a sum of two means (DPO loss + RPO term): compared above
            continue
        (s0, n0), (s1, n1) = shares0[name], shares1[name]
        global_mean, mean_of_means, rank0 = (s0 + s1) / (n0 + n1), (s0 / n0 + s1 / n1) / 2, s0 / n0
        assert last[name] == pytest.approx(global_mean, rel=METRIC_REL), name
        assert abs(mean_of_means - global_mean) > 10 * METRIC_REL * abs(global_mean), name
        assert abs(rank0 - global_mean) > 10 * METRIC_REL * abs(global_mean), name
        report[name] = {"logged": last[name], "1-process": facts_one["validations"][-1]["metrics"][name],
                        "mean_of_rank_means": mean_of_means, "rank0_only": rank0}
    return report


def check_train_metrics(one: dict, two: dict, per_micro_batch: tuple[str, ...] = ()) -> None:
    """``train/*`` of every optimizer step (rank 0's CSV, synced across ranks) as in the 1-process run.
    ``per_micro_batch``: metrics defined per micro-batch (a token mean within it, then a mean over
    ranks, as TRL logs them), which depend on how the global batch is split: not compared."""
    one_rows, two_rows = train_rows(one["csv"]), train_rows(two["csv"])
    assert one_rows.keys() == two_rows.keys() and len(one_rows) == one["summary"]["global_step"]
    for step, metrics in one_rows.items():
        assert two_rows[step].keys() == metrics.keys()
        metrics = {k: v for k, v in metrics.items() if k not in per_micro_batch}
        split = {k: v for k, v in two_rows[step].items() if k not in per_micro_batch}
        assert split == pytest.approx(metrics, rel=1e-4, abs=1e-6), step


def start_weights() -> dict[str, torch.Tensor]:
    """The tiny model's random init with the runs' seed: where SFT, the DPO policy and reference start."""
    from zephyr_lit.models import ModelSpec, build_model

    spec = ModelSpec(name_or_path=asset_path(TINY_MODEL), random_init=True, init_seed=42)
    return {k: v.clone() for k, v in build_model(spec).state_dict().items()}


# ---- SFT ----------------------------------------------------------------------------------------
def test_sft_two_processes_match_one_with_the_same_global_batch(tmp_path, hf_cache):
    """2 ranks x 4 rows vs 1 process x 8 rows, 2 epochs of 4 steps: same weights, losses, schedule,
    validation and exact match (5 prompts: 3 and 2 per rank)."""
    one, two = run_pair(
        tmp_path, hf_cache, "sft", ["optim.lr=0.3", "trainer.max_epochs=2", *odd_exact_match(tmp_path)],
        two=["data.batch_size=4", f"data.cache_dir={tmp_path / 'fresh-cache'}"], one=["data.batch_size=8"],
    )
    assert "val/exact_match" in two["summary"]["metrics"]
    # On a fresh cache only one process tokenised; the other read its cache: the same rows on both
    (facts0, _), (facts1, _) = two["ranks"]
    assert facts0["tokenized_rows"] > 0 and facts1["tokenized_rows"] == 0, (facts0["tokenized_rows"], facts1["tokenized_rows"])
    assert facts0["train_rows_hash"] == facts1["train_rows_hash"] == one["ranks"][0][0]["train_rows_hash"]
    weights = check_same_training(one, two, start_weights())
    assert one["summary"]["global_step"] == 8
    check_train_metrics(one, two)
    report = check_validation(one, two, ["val/loss"])
    print(f"\nSFT weights {weights}\nSFT val {report}")


# ---- DPO ----------------------------------------------------------------------------------------
def dpo_shared(lr: float) -> list[str]:
    """The ddpo recipe, starting from the tiny random-init model (policy and reference alike).
    One pair per validation batch: then every ``val/`` metric is a mean over pairs, whatever the split
    into shards and batches (``logits/*`` and ``nll_loss`` are token means within a batch)."""
    return ["+experiment=ddpo", f"model.name_or_path={asset_path(TINY_MODEL)}", "model.random_init=true",
            "model.init_seed=42", f"optim.lr={lr}", "data.max_prompt_length=32", "data.eval_batch_size=1"]


DPO_VAL = ["val/loss", "val/logps/chosen", "val/logps/rejected", "val/rewards/chosen", "val/rewards/margins"]


def test_dpo_two_processes_match_one_and_keep_one_reference(tmp_path, hf_cache):
    """2 ranks x 4 pairs vs 1 process x 8 pairs (plain sigmoid DPO): the same reference on both ranks,
    untouched by training; the same policy weights; ``train/*`` and ``val/*`` reduced over all pairs."""
    one, two = run_pair(
        tmp_path, hf_cache, "dpo", [*dpo_shared(0.5), "dpo.rpo_alpha=null"],
        two=["data.batch_size=4"], one=["data.batch_size=8"],
    )
    (facts0, _), (facts1, _) = two["ranks"]
    (facts_one, _), = one["ranks"]
    hashes = {f[k] for f in (facts0, facts1, facts_one) for k in ("reference_start_hash", "reference_end_hash")}
    assert hashes == {facts_one["start_hash"]}, "the reference differs between ranks or moved"
    weights = check_same_training(one, two, start_weights())
    check_train_metrics(one, two, per_micro_batch=("train/logits/chosen", "train/logits/rejected"))
    assert {"train/loss", "train/rewards/accuracies", "train/rewards/margins"} <= set(train_rows(two["csv"])[1])
    report = check_validation(one, two, DPO_VAL)
    assert {"val/rewards/accuracies", "val/logits/chosen"} <= set(two["summary"]["metrics"])
    print(f"\nDPO weights {weights}\nDPO val {report}\nDPO final val, 1 process {one['summary']['metrics']}"
          f"\n2 processes {two['summary']['metrics']}")


def test_dpo_precomputed_reference_is_gathered_from_both_ranks(tmp_path, hf_cache):
    """``dpo.ref.precompute=true`` with the recipe's RPO term: each rank computes the log-probs of its
    shard, the gathered cache (in memory on both ranks, on disk once) equals the 1-process cache.
    RPO's NLL is a token mean per micro-batch (as TRL's), so the 1-process run with the same
    micro-batches is 4 pairs x 2 accumulated; it must end on the same weights."""
    one, two = run_pair(
        tmp_path, hf_cache, "dpo-cache", [*dpo_shared(0.2), "dpo.ref.precompute=true", "dpo.rpo_alpha=1.0",
                                          "data.batch_size=4", "trainer.max_epochs=1"],
        two=[f"dpo.ref.cache_dir={tmp_path / 'cache-two'}"],
        one=[f"dpo.ref.cache_dir={tmp_path / 'cache-one'}", "trainer.accumulate_grad_batches=2"],
    )
    (facts0, out0), (facts1, out1) = two["ranks"]
    (facts_one, out_one), = one["ranks"]
    assert facts0["reference_start_hash"] is None and facts1["reference_start_hash"] is None  # freed
    files = {label: {p.stem: torch.load(p) for p in (tmp_path / f"cache-{label}").glob("*/*.pt")}
             for label in ("one", "two")}
    assert set(files["two"]) == set(files["one"]) == {"train", "val"}
    report = {}
    for split in ("train", "val"):
        chosen, rejected = out_one["cached_logps"][split]
        assert chosen.shape == (32 if split == "train" else VAL_ROWS,)
        for cached in (out0["cached_logps"][split], out1["cached_logps"][split],
                       (files["two"][split]["chosen"], files["two"][split]["rejected"])):
            torch.testing.assert_close(cached[0], chosen, atol=1e-5, rtol=1e-6)
            torch.testing.assert_close(cached[1], rejected, atol=1e-5, rtol=1e-6)
        report[split] = max_abs_diff(dict(enumerate(out0["cached_logps"][split])), {0: chosen, 1: rejected})
    weights = check_same_training(one, two, start_weights())
    check_validation(one, two, DPO_VAL)
    print(f"\nDPO precompute cache max abs diff {report}; weights {weights}")
