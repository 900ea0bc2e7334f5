"""GPU smoke test: dSFT then dDPO of a ~95M-parameter Mistral with DeepSpeed ZeRO-3 and bf16-mixed
on one GPU (flash-attention 2 when installed), then one table of throughput and peak memory.

    python -m zephyr_lit.smoke                 # from the repository root, on a CUDA machine
    python -m zephyr_lit.smoke --steps 50 --root /tmp/smoke trainer.devices=2

Each stage is ``train.py`` in its own process (as a user runs it); extra arguments are Hydra
overrides for every stage. Figures come from each run's ``summary.json`` (rank 0). What it checks:

1. packed rows collated for flash-attention 2 give each example's own logits (``packed_flash_check``),
   and the dSFT stage trains packed rows;
2. the ``edges`` stage (dDPO from the dSFT export) validates 33 pairs in batches of 4 and answers the
   55 exact-match prompts 7 per ``generate``: uneven on any number of GPUs, so with
   ``trainer.devices=2`` or more every rank must still run the same collectives (it would hang);
3. the same stage runs 2 epochs of 5 micro-batches with accumulation 2: the epochs' short last
   windows must step too, ``global_step == ceil(5 / 2) x 2 = 6 ==`` the planned steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stage_overrides(root: str, steps: int, flash: bool) -> dict[str, list[str]]:
    common = [
        "model=mistral_100m", "strategy=deepspeed_zero3", "trainer.accelerator=gpu", "trainer.devices=1",
        "trainer.precision=bf16-mixed", f"trainer.max_steps={steps}", f"paths.root={root}", "logger=csv",
        "trainer.enable_progress_bar=false",
    ] + (["model.attn_implementation=flash_attention_2"] if flash else [])
    from_dsft = ["model.random_init=false", f"model.name_or_path={root}/smoke-dsft/latest/model",
                 "model.tokenizer_name_or_path=null"]
    return {
        "dsft": ["+experiment=dsft", "experiment_name=smoke-dsft", *common, "data.packing=true"],
        "ddpo": ["+experiment=ddpo", "experiment_name=smoke-ddpo", *common, *from_dsft],
        "edges": ["+experiment=ddpo", "experiment_name=smoke-edges", *common, *from_dsft, *EDGES],
    }


# 5 micro-batches of 4 pairs per rank and epoch: windows of 2, 2, 1 with accumulation 2 (see windows.py)
EDGES = ["trainer.max_steps=-1", "trainer.max_epochs=2", "trainer.accumulate_grad_batches=2", "data.batch_size=4",
         "data.max_eval_samples=33", "data.eval_batch_size=4", "module.exact_match_batch_size=7"]
EDGE_STEPS = 6


def edge_overrides(extra: list[str]) -> list[str]:
    """``data.max_train_samples`` for 5 micro-batches per rank, from the ``trainer.devices`` and
    ``trainer.num_nodes`` among ``extra``."""
    world = 1
    for key in ("trainer.devices", "trainer.num_nodes"):
        values = [arg.split("=", 1)[1] for arg in extra if arg.startswith(key + "=")]
        world *= int(values[-1]) if values else 1
    return [f"data.max_train_samples={4 * 5 * world}"]


def check_edges(summary: dict) -> str:
    """Item 3 of the checks above, from the edges stage's summary; raises when it does not hold."""
    steps, planned = summary["global_step"], summary.get("planned_steps")
    line = f"accumulation windows: {steps} optimizer steps, {planned} planned, {EDGE_STEPS} expected"
    if not steps == planned == EDGE_STEPS:
        raise AssertionError(f"{line}: an epoch's short last window did not step")
    return line + "; uneven validation and exact match finished on every rank"


PACKED_TOLERANCE = 2e-2  # max |packed - alone| over the logits' max |value|: bf16 rounding, a few ulps


def _packed_errors(attn_implementation: str, device: str) -> tuple[float, float]:
    """Largest logit error of packed examples against each example run alone (bf16, a small random
    Mistral), over the logits' max |value|: ``(the layout training collates for attn_implementation,
    plain (B, T) rows)``. Under flash attention the second shows what the (1, N) layout prevents."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    from zephyr_lit.data.collate import pad_batch
    from zephyr_lit.data.sft import SFTDataModule
    from zephyr_lit.data.tokenize import IGNORE_INDEX, pack_sequences

    generator = torch.Generator().manual_seed(0)
    examples = [torch.randint(3, 512, (int(n),), generator=generator).tolist()
                for n in torch.randint(8, 48, (12,), generator=generator)]
    columns = pack_sequences(examples, [[IGNORE_INDEX] + ids[1:] for ids in examples], max_length=96)
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    data = SFTDataModule(path="unused", packing=True, attn_implementation=attn_implementation)
    data.pad_id = 2
    collated = data.collate()(rows)  # what a training step gets
    plain = pad_batch(rows, pad_id=2, pad_to_multiple_of=8)  # (B, T) whatever the attention

    config = MistralConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.bfloat16)
    model = model.to(device).eval()

    def logits(batch: dict) -> torch.Tensor:
        inputs = {k: batch[k].to(device) for k in ("input_ids", "position_ids") if k in batch}
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits.float()  # (R, T, V)

    alone = [logits({"input_ids": torch.tensor([ids])})[0] for ids in examples]  # each (n, V)
    scale = max(a.abs().max().item() for a in alone)
    # (row, start) of each example in the (B, T) rows, and its start once the rows' tokens are concatenated
    places = [(r, i) for r, row in enumerate(rows) for i, p in enumerate(row["position_ids"]) if p == 0]
    row_starts = [0]
    for row in rows:
        row_starts.append(row_starts[-1] + len(row["input_ids"]))
    flat = collated["input_ids"].size(0) == 1 and len(rows) > 1
    got, by_row = logits(collated), logits(plain)  # (1, N, V) or (B, T, V); (B, T, V)
    errors, row_errors = [], []
    for want, (r, i) in zip(alone, places):
        n = len(want)
        mine = got[0, row_starts[r] + i : row_starts[r] + i + n] if flat else got[r, i : i + n]
        errors.append((mine - want).abs().max().item())
        row_errors.append((by_row[r, i : i + n] - want).abs().max().item())
    return max(errors) / scale, max(row_errors) / scale


def packed_flash_check() -> str:
    """On CUDA with flash-attn: do packed rows, collated as training does for flash_attention_2 (one
    ``(1, N)`` row), give each example's own logits (bf16, a small random Mistral)? Returns a one-line
    result, raises ``AssertionError`` when they do not; skips (saying why) without CUDA or flash-attn."""
    import torch

    if not torch.cuda.is_available():
        return "packed flash-attention check: skipped (no CUDA device)"
    if importlib.util.find_spec("flash_attn") is None:
        return "packed flash-attention check: skipped (flash_attn is not installed)"
    error, row_error = _packed_errors("flash_attention_2", "cuda")
    line = (f"packed flash-attention check: max |packed - alone| = {error:.2e} of the logits' scale "
            f"(tolerance {PACKED_TOLERANCE:.0e}; plain (B, T) rows would give {row_error:.2e})")
    if not error < PACKED_TOLERANCE:
        raise AssertionError(f"{line}: packed examples leak into each other under flash_attention_2")
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zephyr_lit.smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per stage")
    parser.add_argument("--root", default="outputs/smoke", help="paths.root of both runs")
    args, extra = parser.parse_known_args(argv)
    checks = [packed_flash_check()]
    print(checks[0], flush=True)
    flash = importlib.util.find_spec("flash_attn") is not None
    rows = []
    for name, overrides in stage_overrides(str(Path(args.root).resolve()), args.steps, flash).items():
        command = [sys.executable, "train.py", *overrides, *(edge_overrides(extra) if name == "edges" else []), *extra]
        print("$ " + " ".join(command), flush=True)
        if subprocess.run(command, cwd=REPO).returncode != 0:
            print(f"error: the {name} stage failed (see its output above)", file=sys.stderr)
            return 1
        summary = json.loads((Path(args.root) / f"smoke-{name}" / "latest" / "summary.json").read_text())
        if name == "edges":
            checks.append(check_edges(summary))
        else:
            rows.append((name, summary["throughput"], summary["metrics"]))
    print(f"\nGPU smoke: ~95M Mistral, DeepSpeed ZeRO-3, bf16-mixed, attention "
          f"{'flash_attention_2' if flash else 'sdpa'}, {args.steps} steps per stage")
    print(f"{'stage':<6} {'rows/s':>9} {'tokens/s':>10} {'peak GiB':>9}  final validation")
    for name, speed, metrics in rows:
        key = "val/loss" if name == "dsft" else "val/rewards/accuracies"
        print(f"{name:<6} {speed.get('samples_per_s', float('nan')):>9.2f} {speed.get('tokens_per_s', float('nan')):>10.0f} "
              f"{speed.get('peak_memory_gib', float('nan')):>9.2f}  {key} {metrics.get(key, float('nan')):.4g}")
    print("\n".join(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
