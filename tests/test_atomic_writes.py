"""No write half-done: every file a run writes is the old complete one or the new complete one.

The writers (``summary.json``, ``metrics.csv``, the reference cache, checkpoint files) go through
``checkpointing.atomic_write``; each is interrupted here in the middle (an exception after part of the
new content is written, or a SIGKILL) and must leave the old file, and no partial file under its name.
DeepSpeed's sharded checkpoint is a symlink swapped in one rename (``publish_version``): the slow tests
kill a real save, a single process (the file) and 2 ZeRO-3 CPU ranks (the folder), then resume.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.process import run_group
from zephyr_lit import checkpointing
from zephyr_lit.checkpointing import AtomicCheckpointIO, atomic_write, new_version, publish_version, stale_temporaries
from zephyr_lit.loggers import CSVMetricsLogger
from zephyr_lit.reference import load_logps, save_logps
from zephyr_lit.run import write_summary

REPO = Path(__file__).resolve().parents[1]
HOOKS = "tests.failsafe.hooks"


class Interrupted(Exception):
    pass


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- atomic_write and the writers that use it ---------------------------------------------------
def test_an_exception_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(Interrupted):
        with atomic_write(path) as handle:
            handle.write("new, half")
            handle.flush()
            raise Interrupted
    assert path.read_text() == "old" and files(tmp_path) == ["out.txt"]
    with atomic_write(path) as handle:
        handle.write("new")
    assert path.read_text() == "new" and files(tmp_path) == ["out.txt"]


def test_a_kill_mid_write_leaves_the_old_file_and_only_a_hidden_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    code = ("import os, signal, sys; from zephyr_lit.checkpointing import atomic_write\n"
            "with atomic_write(sys.argv[1], 'wb') as f:\n"
            "    f.write(b'new' * 1000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    done = run_group([sys.executable, "-c", code, str(path)], 60, cwd=REPO)
    assert done.returncode == -9
    assert path.read_bytes() == b"old"
    (left,) = stale_temporaries(path)  # what the next AtomicCheckpointIO save of this path removes
    assert left.name.startswith(".out.bin.") and left.stat().st_size == 3000


def test_atomic_write_refuses_to_append(tmp_path):
    with pytest.raises(ValueError, match="only a fresh write"):
        with atomic_write(tmp_path / "x", "a"):
            pass


def test_summary_interrupted_mid_dump_keeps_the_old_summary(tmp_path):
    path = tmp_path / "summary.json"
    write_summary(path, {"global_step": 1})
    with pytest.raises(TypeError):  # json.dump streams: the first keys are written before it fails
        write_summary(path, {"global_step": 2, "metrics": {"val/loss": 0.5}, "bad": object()})
    assert json.loads(path.read_text()) == {"global_step": 1} and files(tmp_path) == ["summary.json"]


def test_csv_rewrite_interrupted_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    logger = CSVMetricsLogger(str(path))
    logger.log_metrics({"val/loss": 2.0}, step=0)
    logger.log_metrics({"val/loss": 1.5}, step=1)
    before = path.read_bytes()

    def half_then_fail(self, rows):
        self.writerow(rows[0])
        raise Interrupted

    monkeypatch.setattr(csv.DictWriter, "writerows", half_then_fail)
    with pytest.raises(Interrupted):
        logger.log_metrics({"train/loss": 1.0}, step=2)  # a new column: the whole file is rewritten
    assert path.read_bytes() == before and files(tmp_path) == ["metrics.csv"]


def test_csv_append_after_a_torn_last_line_drops_it_instead_of_gluing_rows(tmp_path):
    path = tmp_path / "metrics.csv"
    CSVMetricsLogger(str(path)).log_metrics({"train/loss": 2.0}, step=1)
    with open(path, "ab") as handle:
        handle.write(b"2,1.")  # a kill in the middle of writing step 2's row
    CSVMetricsLogger(str(path)).log_metrics({"train/loss": 1.5}, step=2)  # the resumed run
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [{"step": "1", "train/loss": "2.0"}, {"step": "2", "train/loss": "1.5"}]


def test_reference_cache_interrupted_keeps_the_old_cache(tmp_path, monkeypatch):
    path = tmp_path / "key" / "train.pt"
    save_logps(path, torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
    real_save = torch.save

    def half_then_fail(obj, handle):
        real_save(obj, handle)
        handle.truncate(handle.tell() // 2)
        raise Interrupted

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(Interrupted):
        save_logps(path, torch.tensor([9.0, 9.0]), torch.tensor([9.0, 9.0]))
    monkeypatch.undo()
    chosen, rejected = load_logps(path)
    assert chosen.tolist() == [1.0, 2.0] and rejected.tolist() == [3.0, 4.0]
    assert files(path.parent) == ["train.pt"]


def test_checkpoint_file_interrupted_keeps_the_old_one_and_the_next_save_clears_leftovers(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)
    stale = checkpointing.temporary_sibling(path)
    stale.write_bytes(b"left by a killed save")

    def half_then_fail(checkpoint, handle):
        handle.write(b"PK\x03\x04 half")
        raise Interrupted

    io.dump = half_then_fail
    with pytest.raises(Interrupted):
        io.save_checkpoint({"global_step": 2}, path)
    assert torch.load(path)["global_step"] == 1 and files(tmp_path) == ["last.ckpt"]
    del io.dump
    io.save_checkpoint({"global_step": 3}, path)
    assert torch.load(path)["global_step"] == 3


# ---- the sharded checkpoint folder ---------------------------------------------------------------
def write_version(final: Path, token: str, step: int) -> Path:
    version = new_version(final, token)
    (version / "checkpoint").mkdir(parents=True)
    (version / "checkpoint" / "shard0.pt").write_text(str(step))
    (version / "latest").write_text("checkpoint")
    return version


def step_of(final: Path) -> int:
    return int((final / "checkpoint" / "shard0.pt").read_text())


def test_a_published_folder_is_swapped_in_one_rename_and_old_versions_go(tmp_path):
    final = tmp_path / "last.ckpt"
    publish_version(final, write_version(final, "a", 1))
    assert final.is_symlink() and final.is_dir() and step_of(final) == 1
    write_version(final, "b", 2)  # a save killed before it was published
    assert step_of(final) == 1
    publish_version(final, write_version(final, "c", 3))
    assert step_of(final) == 3 and files(tmp_path) == [".last.ckpt-c", "last.ckpt"]


def test_a_kill_after_the_swap_before_the_cleanup_leaves_the_new_one(tmp_path, monkeypatch):
    final = tmp_path / "last.ckpt"
    publish_version(final, write_version(final, "a", 1))
    def killed(final):
        raise Interrupted

    monkeypatch.setattr(checkpointing, "remove_unreferenced_versions", killed)
    with pytest.raises(Interrupted):
        publish_version(final, write_version(final, "b", 2))
    assert step_of(final) == 2  # published; the old folder is left for the next save to remove
    monkeypatch.undo()
    publish_version(final, write_version(final, "c", 3))
    assert files(tmp_path) == [".last.ckpt-c", "last.ckpt"]


def test_a_real_folder_from_before_is_kept_until_the_first_versioned_one_replaces_it(tmp_path):
    final = tmp_path / "last.ckpt"
    (final / "checkpoint").mkdir(parents=True)
    (final / "checkpoint" / "shard0.pt").write_text("1")
    publish_version(final, write_version(final, "a", 2))
    assert final.is_symlink() and step_of(final) == 2 and files(tmp_path) == [".last.ckpt-a", "last.ckpt"]


# ---- real saves, killed -------------------------------------------------------------------------
TINY = ["logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "data.exact_match_path=null", "data.max_train_samples=32", "data.max_eval_samples=8", "data.batch_size=4",
        "callbacks.checkpoint.every_n_train_steps=1"]


def kill_and_record(tmp_path: Path, step: int) -> list[str]:
    return [f"+callbacks.kill._target_={HOOKS}.KillMidSave", f"+callbacks.kill.step={step}",
            f"+callbacks.kill.out={tmp_path / 'killed'}"]


def record(folder: Path) -> list[str]:
    return [f"+callbacks.record._target_={HOOKS}.Record", f"+callbacks.record.out={folder}"]


@pytest.mark.slow
def test_a_kill_mid_save_of_the_checkpoint_file_leaves_the_previous_one_to_resume(tmp_path, hf_cache):
    from tests.conftest import compose_config
    from zephyr_lit.run import train

    run = tmp_path / "run"
    common = [f"paths.root={tmp_path}", f"paths.output_dir={run}", f"data.cache_dir={hf_cache}",
              "trainer.accelerator=cpu", *TINY]
    cmd = [sys.executable, "train.py", *common, "trainer.max_steps=3", *kill_and_record(tmp_path, 2)]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = run_group(cmd, 300, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == -9, done.stdout[-3000:]
    assert (tmp_path / "killed" / "killing0").read_text() == "2"  # killed inside the save of step 2
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 1
    (half,) = stale_temporaries(last)  # the half-written step 2, under a hidden name
    assert 0 < half.stat().st_size < last.stat().st_size

    summary = train(compose_config([*common, "trainer.max_steps=3", "ckpt_path=last", *record(tmp_path / "resumed")]),
                    update_latest=False)
    assert json.loads((tmp_path / "resumed" / "rank0.json").read_text())["start_step"] == 1
    assert summary["global_step"] == 3 and not stale_temporaries(last)


@pytest.mark.slow
def test_a_kill_mid_save_of_the_zero3_folder_leaves_the_previous_one_to_resume(tmp_path):
    """2 CPU ranks under ZeRO-3: at the save of step 2, rank 1 half-writes its first shard file, then the
    whole process group is SIGKILLed (rank 0 may be writing too). The resumed run starts at step 1."""
    from tests.zero3.launch import run_zero3

    common = [*TINY, "strategy.timeout.minutes=7"]
    with pytest.raises(AssertionError):  # run_zero3 asserts a clean exit: this one was killed
        run_zero3(tmp_path, "killed", *common, "trainer.max_steps=3", *kill_and_record(tmp_path, 2), timeout=300)
    assert (tmp_path / "killed" / "killing1").read_text() == "2"
    checkpoints = tmp_path / "run" / "checkpoints"
    last = checkpoints / "last.ckpt"
    assert last.is_symlink() and (last / "latest").read_text() == "checkpoint"
    published, = [p for p in checkpoints.iterdir() if p.name == os.readlink(last)]
    partial = [p for p in checkpoints.iterdir() if p.name.startswith(".last.ckpt-") and p != published]
    assert len(partial) == 1  # the killed save's folder, never published

    facts = run_zero3(tmp_path, "resumed", *common, "trainer.max_steps=3", "ckpt_path=last",
                      *record(tmp_path / "record"), timeout=300)
    for rank in range(2):
        seen = json.loads((tmp_path / "record" / f"rank{rank}.json").read_text())
        assert seen["start_step"] == 1 and facts[rank]["global_step"] == 3
        assert seen["pg_timeout_s"] == 7 * 60  # strategy.timeout reached DeepSpeed's process group
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted([os.readlink(last), "last.ckpt"])
