"""A stage's input: a hub name, a local folder (hub layout) or a file, read through ``data.load``.

Prompts (``stage=completions``) come from any chat layout: ``messages`` or ``chosen`` (a conversation:
its turns up to the last user turn), or ``instruction`` / ``prompt`` / ``question`` (one user turn),
or a ``.txt`` file with one question per line. Rated rows (``stage=rate``, ``stage=binarize``) are in
the ``openbmb/UltraFeedback`` schema. Bad rows stop the stage with one line naming file, split, row
and field, before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from zephyr_lit.chat import ROLES
from zephyr_lit.data.load import EXTENSIONS, load_split, looks_local
from zephyr_lit.errors import DataError

SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")


@dataclass(frozen=True)
class Prompt:
    """One prompt conversation (ends with a user turn) and where it came from."""

    key: str  # sha256 of the conversation: the same question under another system prompt is another prompt
    messages: tuple[dict, ...]
    source: str

    @property
    def instruction(self) -> str:
        """The last user turn: what the completions answer."""
        return self.messages[-1]["content"]

    @property
    def prompt(self) -> str:
        """The first user turn, as ultrachat's and ultrafeedback_binarized's ``prompt``."""
        return next(m["content"] for m in self.messages if m["role"] == "user")


def conversation_key(messages: list[dict] | tuple[dict, ...]) -> str:
    """sha256 hex of the canonical JSON of ``[{role, content}]``."""
    canonical = [{"role": m["role"], "content": m["content"]} for m in messages]
    return hashlib.sha256(json.dumps(canonical, ensure_ascii=False).encode("utf-8")).hexdigest()


def input_splits(path: str, split: str | list[str] | None) -> list[str]:
    """The splits to read: as given; else every split of a local folder (its ``data/`` shards, or its
    top-level data files); else ``train``."""
    if split is not None:
        return [split] if isinstance(split, str) else list(split)
    root = Path(path).expanduser()
    if root.is_dir():
        files = sorted((root / "data").glob("*")) or [f for f in root.glob("*") if f.name != "manifest.json"]
        names = {SHARD.sub(r"\g<split>", f.name.split(".")[0]) for f in files if f.suffix in EXTENSIONS}
        if names:
            return sorted(names)
    return ["train"]


def read_rows(path: str, split: str | list[str] | None, cache_dir: str | None = None) -> list[tuple[str, list[dict]]]:
    """``[(where-prefix, rows)]`` per split; a ``.txt`` file gives rows ``{instruction}``, one per line."""
    if path is None:
        raise DataError("input is not set: give input=<hub name, local folder or file>")
    file = Path(path).expanduser()
    if file.suffix == ".txt":
        if not file.is_file():
            raise DataError(f"input {file} does not exist")
        lines = file.read_text(encoding="utf-8").splitlines()
        return [(f"{file} split 'train'", [{"instruction": line.strip()} for line in lines if line.strip()])]
    if not file.exists() and looks_local(path):
        raise DataError(f"input {path} does not exist (expected a hub name, a local folder or a file)")
    out = []
    for name in input_splits(path, split):
        loaded = load_split(path, name, cache_dir)
        out.append((f"{loaded.source} split '{name}'", [dict(r) for r in loaded.dataset]))
    return out


def check_turns(messages: object, at: str, field: str) -> list[dict]:
    """``messages`` as ``[{role, content}]`` with known roles and string contents."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{at}: field '{field}' must be a non-empty list of {{role, content}} messages", field=field)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{at}: field '{field}[{i}]' must be {{role: system|user|assistant, content: str}}, "
                            f"got {m!r:.80}", field=f"{field}[{i}]")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def prompt_messages(row: dict, at: str, upto: str = "last") -> list[dict]:
    """The prompt conversation of a row: its turns up to the ``upto`` (``last`` or ``first``) user
    turn, or one user turn."""
    for field in ("messages", "chosen"):
        if row.get(field) is not None:
            turns = check_turns(row[field], at, field)
            users = [i for i, m in enumerate(turns) if m["role"] == "user"]
            last_user = (users[-1] if upto == "last" else users[0]) if users else None
            if last_user is None:
                raise DataError(f"{at}: field '{field}' has no user turn", field=field)
            if not turns[last_user]["content"].strip():
                raise DataError(f"{at}: field '{field}[{last_user}].content' is an empty user turn", field=field)
            return turns[: last_user + 1]
    for field in ("instruction", "prompt", "question"):
        if isinstance(row.get(field), str):
            if not row[field].strip():
                raise DataError(f"{at}: field '{field}' is empty", field=field)
            return [{"role": "user", "content": row[field]}]
    raise DataError(f"{at}: no prompt: expected a 'messages', 'chosen', 'instruction', 'prompt' or 'question' field "
                    f"(fields: {', '.join(sorted(row))})")


def read_prompts(
    path: str, split: str | list[str] | None, cache_dir: str | None = None, upto: str = "last"
) -> tuple[list[Prompt], int]:
    """The distinct prompts of the input in order (conversations cut after their ``upto`` user turn),
    and how many duplicates were merged."""
    prompts: dict[str, Prompt] = {}
    duplicates = 0
    for at_split, rows in read_rows(path, split, cache_dir):
        for index, row in enumerate(rows):
            at = f"{at_split} row {index}"
            messages = prompt_messages(row, at, upto)
            key = conversation_key(messages)
            if key in prompts:
                duplicates += 1
                continue
            prompts[key] = Prompt(key, tuple(messages), str(row.get("source") or Path(str(path)).name))
    return list(prompts.values()), duplicates


def read_rated(path: str, split: str | list[str] | None, cache_dir: str | None = None) -> list[tuple[str, dict]]:
    """UltraFeedback-schema rows ``[(at, row)]``, each with ``messages`` (its prompt conversation) set."""
    out = []
    for at_split, rows in read_rows(path, split, cache_dir):
        for index, row in enumerate(rows):
            at = f"{at_split} row {index}"
            completions = row.get("completions")
            if not isinstance(completions, list):
                raise DataError(f"{at}: field 'completions' must be a list of {{model, response, ...}}", field="completions")
            for i, completion in enumerate(completions):
                if not isinstance(completion, dict) or not isinstance(completion.get("response"), str):
                    raise DataError(f"{at}: field 'completions[{i}].response' must be a string",
                                    field=f"completions[{i}].response")
            out.append((at, {**row, "messages": prompt_messages(row, at)}))
    return out

