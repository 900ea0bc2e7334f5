"""Shared fixtures: compose the real Hydra config with test overrides, outputs in a temp folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import zephyr_lit.config  # noqa: F401  (registers ${asset:...})
from zephyr_lit.assets import asset_path

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# A few fast steps on the embedded default, CSV logging only, nothing written outside tmp.
FAST = [
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.max_train_samples=256",
    "data.max_eval_samples=64",
]


def compose_config(overrides: list[str], config_name: str = "config"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory) -> Path:
    """One datasets cache for the whole session, away from the user's ~/.cache."""
    return tmp_path_factory.mktemp("hf-datasets-cache")


@dataclass(frozen=True)
class TrainedRecipe:
    """A finished run of a shipped embedded recipe: ``root`` is its ``paths.root``, ``model`` its export."""

    root: Path
    model: Path
    summary: dict


def train_recipe(experiment: str, root: Path, hf_cache: Path, *overrides: str) -> TrainedRecipe:
    """``python train.py +experiment=<experiment> paths.root=<root>`` as shipped (CSV logging, no progress bar)."""
    from zephyr_lit.run import train

    summary = train(compose_config([f"+experiment={experiment}", f"paths.root={root}", f"data.cache_dir={hf_cache}",
                                    "logger=csv", "trainer.enable_progress_bar=false", *overrides]))
    return TrainedRecipe(root, Path(summary["export_dir"]), summary)


@pytest.fixture(scope="session")
def embedded_dsft(tmp_path_factory, hf_cache) -> TrainedRecipe:
    """The shipped ``+experiment=dsft`` recipe, trained once per session (about 2 minutes on 2 cores) for
    every slow test that starts from the embedded dSFT export. Tests start from ``embedded_dsft.model``
    with a ``paths.root`` of their own; only the recipe test runs ``+experiment=ddpo`` under ``root``, as a
    user would. Nothing may write under ``root/dsft``."""
    root = tmp_path_factory.mktemp("embedded-dsft")
    recipe = train_recipe("dsft", root, hf_cache)
    assert json.loads((root / "dsft" / "latest" / "summary.json").read_text())["export_dir"] == str(recipe.model)
    return recipe


@pytest.fixture
def make_cfg(tmp_path, hf_cache):
    """``make_cfg(*overrides, fast=True)``: the composed config, writing under ``tmp_path``."""

    def make(*overrides: str, fast: bool = True, output_dir: Path | None = None):
        base = [
            f"paths.root={tmp_path / 'outputs'}",
            f"paths.output_dir={output_dir or tmp_path / 'outputs' / 'run'}",
            f"data.cache_dir={hf_cache}",
        ]
        return compose_config(base + (FAST if fast else []) + list(overrides))

    return make


def odd_exact_match(tmp_path: Path, rows: int = 5) -> list[str]:
    """The first ``rows`` checkable prompts (an odd number: 3 and 2 on two ranks), 2 per ``generate``."""
    source = Path(asset_path("data/ultrachat_tiny/exact_match.jsonl")).read_text().splitlines()[:rows]
    path = tmp_path / "exact_match.jsonl"
    path.write_text("\n".join(source) + "\n")
    return [f"data.exact_match_path={path}", "module.exact_match_batch_size=2", "module.exact_match_max_new_tokens=8"]
