"""notebooks/quickstart.ipynb runs top to bottom: a short dSFT run and a short dDPO run from its export
(parameters injected the papermill way), the model card's chat with each export, the dSFT loss plot and
the dDPO reward plot, the embedded distil pipeline, and the MT-Bench-style table and chart of both exports,
with every file written under pytest's tmp folder."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK = NOTEBOOKS / "quickstart.ipynb"


def with_parameters(nb, **values) -> None:
    """Replace the source of the cell tagged ``parameters`` with ``NAME = repr(value)`` lines."""
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    cells[0].source = "\n".join(f"{name} = {value!r}" for name, value in values.items())


def this_interpreters_kernel() -> AsyncKernelManager:
    """A ``python3`` kernel on ``sys.executable`` (ipykernel's built-in spec): no kernelspec installed
    elsewhere (``~/.local/share/jupyter``, a system Jupyter) can point the test at another Python."""
    assert sys.executable, "no sys.executable"
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))


def outputs(nb, output_type: str) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == output_type]


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, hf_cache, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf_cache))  # the kernel inherits the environment
    monkeypatch.delenv("MPLBACKEND", raising=False)  # let ipykernel pick its inline backend (PNG outputs)
    monkeypatch.setenv("WANDB_MODE", "offline")  # belt and braces: MAX_STEPS set means CSV only
    root = tmp_path / "outputs"
    before = sorted(p.name for p in NOTEBOOKS.iterdir())

    nb = nbformat.read(NOTEBOOK, as_version=4)
    with_parameters(nb, MAX_STEPS=40, OUTPUT_ROOT=str(root))
    client = NotebookClient(
        nb, km=this_interpreters_kernel(), timeout=600, kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # cwd = notebooks/, as in Jupyter
    )
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails

    assert not outputs(nb, "error")
    text = "".join(o.get("text", "") for o in outputs(nb, "stream") if o.get("name") == "stdout")
    assert "dSFT summary: 40 optimizer steps" in text, text[-3000:]
    assert re.search(r"^val/loss +[\d.]+ +[\d.]+$", text, re.M), text[-3000:]  # before and after
    assert "with the pirate system prompt:" in text and "without a system prompt:" in text, text[-3000:]
    assert "dDPO summary: 40 optimizer steps" in text, text[-3000:]
    assert re.search(r"^val/rewards/margins +-?0 +-?[\d.e+-]+$", text, re.M), text[-3000:]  # policy == reference at step 0
    assert "dDPO, with the pirate system prompt:" in text, text[-3000:]
    assert re.search(r"^distilled dialogues: seeds 19\d, dialogues 19\d", text, re.M), text[-3000:]
    assert "distilled binarize:" in text and "a dialogue:" in text and "chosen   (" in text, text[-3000:]
    assert "MT-Bench-style scores (1-10), judge rule:" in text, text[-3000:]
    assert re.search(r"^overall +[\d.]+ +[\d.]+$", text, re.M), text[-3000:]  # dsft and ddpo side by side
    evaluated = root / "evaluate" / "mt_bench"
    assert sorted(p.name for p in (evaluated / "model_answer").iterdir()) == ["ddpo.jsonl", "dsft.jsonl"]
    assert (evaluated / "rule_results.csv").read_text().startswith("score,")
    for folder in ("sft", "completions", "rated", "prefs"):
        assert (root / "distilled" / folder / "manifest.json").is_file(), folder
    for stage in ("dsft", "ddpo"):
        assert (root / stage / "latest" / "model" / "model.safetensors").is_file(), stage
        assert (root / stage / "latest" / "metrics.csv").is_file(), stage
    figures = [o for o in outputs(nb, "display_data") if "image/png" in o.get("data", {})]
    assert len(figures) >= 3, f"{len(figures)} figure(s); expected the dSFT loss, dDPO reward and MT-Bench plots"
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before, "the notebook wrote into notebooks/"
