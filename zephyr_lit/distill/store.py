"""A stage's output folder: append-only keyed records while it runs, atomic hub-layout files at the end.

```
<output_dir>/manifest.json                 stage, settings (what changes the output), their hash, status
<output_dir>/.work/records.jsonl           one JSON record per finished unit, appended and fsynced
<output_dir>/.work/records.rank<r>.jsonl   the same for rank r > 0 when several processes generate
<output_dir>/data/<split>-00000-of-00001.jsonl   the final splits (each written atomically)
```
Each rank appends only to its own part file and reads every part (so a rerun, with any number of
processes, skips what any rank finished); rank 0 alone writes the manifest and the final files.
A stage asks ``done()`` for the records already written, does the rest, appends them, then
``finish``es. A killed stage leaves at most a torn last line, which ``done()`` cuts off; the rerun
continues from there, and since every draw is seeded by the record's key (never by a running RNG),
it ends with the same files as an uninterrupted run. A folder written under other settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from zephyr_lit.checkpointing import atomic_write
from zephyr_lit.errors import ConfigError

# Settings that change how fast a stage runs, not what it writes: left out of the hash.
RUNTIME_KEYS = frozenset(
    {"max_concurrency", "max_retries", "timeout", "backoff", "max_backoff", "batch_size", "chunk_size", "device",
     "retries", "api_key_env", "base_url", "gpu_memory_utilization"}
)


def output_settings(settings: object) -> object:
    """``settings`` without the runtime keys (``RUNTIME_KEYS``), at any depth."""
    if isinstance(settings, Mapping):
        return {k: output_settings(v) for k, v in settings.items() if k not in RUNTIME_KEYS}
    if isinstance(settings, (list, tuple)):
        return [output_settings(v) for v in settings]
    return settings


def settings_hash(settings: Mapping) -> str:
    """sha256 of the canonical JSON of the output-affecting settings."""
    text = json.dumps(output_settings(settings), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def differing_keys(old: object, new: object, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two settings trees."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in differing_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".") or "(all)"]


@dataclass
class StageOutput:
    """What a stage made: its splits (``split -> rows``), its counts (written to the manifest) and any
    other files (``name -> text``, e.g. ``questions.txt``), written next to ``data/``."""

    splits: dict[str, list[dict]]
    counts: dict[str, int]
    files: dict[str, str] = field(default_factory=dict)


class StageStore:
    """The output folder of one stage run. ``settings`` are the output-affecting settings (JSON-able)."""

    def __init__(self, folder: str | os.PathLike, stage: str, settings: Mapping, rank: int = 0) -> None:
        self.folder = Path(folder)
        self.stage = stage
        self.settings = json.loads(json.dumps(output_settings(settings), sort_keys=True, default=str))
        self.hash = settings_hash(self.settings)
        name = "records.jsonl" if rank == 0 else f"records.rank{rank}.jsonl"
        self.records_path = self.folder / ".work" / name
        self.manifest_path = self.folder / "manifest.json"

    def open(self) -> bool:
        """Claim the folder (``check`` then ``claim``): True when it already holds this stage's finished
        output (nothing to do). Several ranks: each ``check``s, then rank 0 alone ``claim``s."""
        if self.check():
            return True
        self.claim()
        return False

    def check(self) -> bool:
        """Read-only: True when the folder holds this stage's finished output, False when it is new or
        this stage's own unfinished one. Another stage's, or other settings': ConfigError naming what
        differs; files without a manifest: ConfigError."""
        manifest = self.manifest()
        if manifest is None:
            if self.folder.is_dir() and any(p.name not in (".hydra", ".work") and not p.name.endswith(".log")
                                            for p in self.folder.iterdir()):
                raise ConfigError(f"output_dir {self.folder} holds files but no manifest.json; use an empty or new folder")
            return False
        if manifest.get("stage") != self.stage or manifest.get("hash") != self.hash:
            what = (
                f"stage={manifest.get('stage')}" if manifest.get("stage") != self.stage
                else "other settings (" + ", ".join(differing_keys(manifest.get("settings"), self.settings)) + ")"
            )
            raise ConfigError(
                f"output_dir {self.folder} was written by {what}; rerun with the same config to continue it, "
                "or use another output_dir"
            )
        return manifest.get("status") == "complete"

    def claim(self) -> None:
        """Make the work folder and mark the stage running (a new folder gets its manifest)."""
        self.records_path.parent.mkdir(parents=True, exist_ok=True)
        if self.manifest() is None:
            self.write_manifest("running")

    def manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def write_manifest(self, status: str, counts: Mapping | None = None) -> None:
        body = {"stage": self.stage, "hash": self.hash, "status": status, "settings": self.settings}
        if counts is not None:
            body["counts"] = dict(counts)
        with atomic_write(self.manifest_path) as handle:
            json.dump(body, handle, indent=2, sort_keys=True)
            handle.write("\n")

    def done(self) -> list[dict]:
        """The records written so far by every rank: this rank's part first, then the others' in rank
        order, each in the order written. A torn last line (a kill mid-append) is cut off this rank's
        part and skipped in the others' (their own rank cuts it)."""
        parts = sorted(self.records_path.parent.glob("records*.jsonl"), key=part_order)
        parts = [self.records_path] + [p for p in parts if p != self.records_path]
        records = []
        for path in parts:
            if not path.is_file():
                continue
            data = path.read_bytes()
            whole = data[: data.rfind(b"\n") + 1]
            if path == self.records_path and len(whole) != len(data):
                with open(path, "r+b") as handle:
                    handle.truncate(len(whole))
            records += [json.loads(line) for line in whole.decode("utf-8").splitlines() if line.strip()]
        return records

    def append(self, records: Iterable[dict]) -> None:
        """Append ``records`` as JSON lines, in one write, flushed to disk before returning."""
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)  # key order kept: a resumed record reads back as it was made
        if not text:
            return
        with open(self.records_path, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    def finish(self, output: StageOutput, complete: bool = True) -> None:
        """Write each split to ``data/<split>-00000-of-00001.jsonl`` atomically, then the manifest (last:
        a complete manifest means complete files). ``complete=False`` (some requests failed) keeps the
        status ``running``: the same command then retries what is missing."""
        for split, rows in output.splits.items():
            write_split(self.folder, split, rows)
        for name, text in output.files.items():
            with atomic_write(self.folder / name) as handle:
                handle.write(text)
        self.write_manifest("complete" if complete else "running", output.counts)


def part_order(path: Path) -> int:
    """0 for ``records.jsonl``, r for ``records.rank<r>.jsonl``."""
    middle = path.name[len("records"): -len(".jsonl")]
    return int(middle[len(".rank"):]) if middle.startswith(".rank") else 0


def split_path(folder: Path, split: str) -> Path:
    return folder / "data" / f"{split}-00000-of-00001.jsonl"


def write_split(folder: Path, split: str, rows: Iterable[dict]) -> Path:
    """``rows`` as the hub layout's JSON-lines shard of ``split``, replaced in one rename."""
    path = split_path(folder, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
