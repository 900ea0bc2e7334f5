"""Load the splits of a chat data set from a hub name, a local folder or a local file: one code path.

Local folders use the hub layout, ``<folder>/data/<split>-00000-of-00001.{parquet,jsonl,json}``
(any number of shards), or ``<folder>/<split>.{parquet,jsonl,json}``. A local file is one split; the
other split is then given as a file path too (``data.test_split=/path/test.jsonl``).
Everything ends in ``datasets.load_dataset``, so Arrow caching works the same for every source.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets

from zephyr_lit.errors import DataError

EXTENSIONS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


@dataclass
class Split:
    """One loaded split and where it came from (for error messages)."""

    name: str
    source: str
    dataset: datasets.Dataset


def _builder_for(files: list[Path], where: str) -> str:
    kinds = {EXTENSIONS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"{where}: expected .parquet, .jsonl or .json files of one kind, found {[f.name for f in files]}")
    return kinds.pop()


def _split_files(folder: Path, split: str) -> list[Path]:
    candidates = sorted((folder / "data").glob(f"{split}-*")) or sorted((folder / "data").glob(f"{split}.*"))
    candidates = candidates or sorted(folder.glob(f"{split}.*")) or sorted(folder.glob(f"{split}-*"))
    return [f for f in candidates if f.suffix in EXTENSIONS]


def local_split_files(path: str, split: str) -> list[Path] | None:
    """The files of ``split`` under a local ``path``; None when ``path`` is not local."""
    split_as_file = Path(split).expanduser()
    if split_as_file.suffix in EXTENSIONS:
        if not split_as_file.is_file():
            raise DataError(f"data split file {split_as_file} does not exist")
        return [split_as_file]
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        return None
    files = _split_files(root, split)
    if not files:
        found = sorted(p.name for p in (root / "data").glob("*")) if (root / "data").is_dir() else []
        raise DataError(
            f"{root}: no files for split '{split}' (looked for data/{split}-*.{{parquet,jsonl,json}} "
            f"and {split}.{{parquet,jsonl,json}}; data/ holds {found}); set data.train_split / data.test_split"
        )
    return files


def looks_local(path: str) -> bool:
    """True for paths that can only mean the local disk: absolute, ./, ../, ~, a data-file suffix, more
    than one slash (hub ids are ``name`` or ``namespace/name``), or something that exists here."""
    return (
        path.startswith(("/", "./", "../", "~"))
        or Path(path).suffix in EXTENSIONS
        or path.strip("/").count("/") >= 2
        or Path(path).exists()
    )


RowCheck = Callable[[dict, str], object]


def find_bad_json_row(files: list[Path], split: str, row_check: RowCheck) -> None:
    """Scan JSON-lines files row by row and raise the first row's ``DataError``.

    Arrow refuses a JSON file whose rows disagree on a field's type (a string where others hold a
    list) with an error that names no row; this scan finds the row and field for the user.
    """
    for file in files:
        with open(file, encoding="utf-8") as handle:
            for row_index, line in enumerate(handle):
                if not line.strip():
                    continue
                at = f"{file} split '{split}' row {row_index}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{at}: not valid JSON ({error.msg})") from None
                row_check(row, at)


def load_split(path: str, split: str, cache_dir: str | None = None, row_check: RowCheck | None = None) -> Split:
    """Load one split of ``path`` as a ``datasets.Dataset``.

    ``row_check(row, at)`` is used only to explain a local JSON file that Arrow cannot read.
    """
    files = local_split_files(path, split)
    if files is None:
        if looks_local(path):
            raise DataError(f"data.path {path} does not exist (expected a hub name, a local folder or a file)")
        dataset = datasets.load_dataset(path, split=split, cache_dir=cache_dir)
        return Split(split, f"hub:{path}", dataset)
    builder = _builder_for(files, str(path))
    source = str(files[0]) if len(files) == 1 else f"{files[0].parent}/{split}-*"
    try:
        dataset = datasets.load_dataset(
            builder, data_files={"split": [str(f) for f in files]}, split="split", cache_dir=cache_dir
        )
    except Exception as error:  # Arrow's schema errors name no row: find it, else say which file
        if builder == "json" and row_check is not None:
            find_bad_json_row(files, split, row_check)
        raise DataError(f"{source} split '{split}': could not be read ({type(error).__name__}: {error})") from error
    return Split(split, source, dataset)
