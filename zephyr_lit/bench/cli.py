"""``python -m zephyr_lit.bench``: zephyr-lit vs TRL on one model and one synthetic workload.

The parent writes the model folder (config + tokenizer, no weights) and the token rows once, then
runs every (case, side, repeat) as a fresh ``python -m zephyr_lit.bench.worker`` process,
interleaved: for each repeat, for each case, ours and TRL back to back (which of the two goes first
alternates between repeats, so that a slow drift of the machine does not favour one side). It prints
one table of medians and ours/TRL ratios and writes, under ``--out``:
``runs.jsonl`` (every run, every step), ``runs.csv``, ``summary.json``, ``table.txt`` and the jobs'
logs under ``jobs/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from zephyr_lit.bench.cases import CASE_NAMES, select_cases
from zephyr_lit.bench.measure import peak_tflops
from zephyr_lit.bench.report import (
    check_targets,
    format_legend,
    format_table,
    format_targets,
    summarise_case,
    write_csv,
)
from zephyr_lit.bench.workload import (
    QUICK,
    Workload,
    describe_model,
    dpo_rows,
    parameter_count,
    rows_needed,
    sft_rows,
    write_model_folder,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = """examples:
  python -m zephyr_lit.bench --quick                 # every case, a few steps, 1 repeat (minutes)
  python -m zephyr_lit.bench                         # the figures: 2 warm-up + 8 timed steps, 3 repeats (~1 h on 2 CPU threads)
  python -m zephyr_lit.bench --cases dpo --out DIR   # DPO cases only; later --cases sft --out DIR adds SFT
  python -m zephyr_lit.bench --report DIR            # the table again from DIR/runs.jsonl
  python -m zephyr_lit.bench --device cuda           # on a GPU, with MFU
  python -m zephyr_lit.bench --quick --cases dpo-online --profile --set steps=3   # torch.profiler tables
  python -m zephyr_lit.bench --quick --set layers=2 hidden=128 intermediate=256 heads=4 kv_heads=2 vocab=1024
                                                     # a tiny model, to check the harness itself"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m zephyr_lit.bench", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"iterate: {QUICK['pairs']} rows, {QUICK['warmup']} warm-up + "
                             f"{QUICK['steps'] - QUICK['warmup']} timed steps, 1 repeat")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="runs per trainer and case (default 3, quick 1)")
    parser.add_argument("--cases", nargs="*", default=None, help=f"a subset of: {', '.join(CASE_NAMES)} (or dpo, sft)")
    parser.add_argument("--sides", nargs="*", default=["ours", "trl"], choices=("ours", "trl"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 2)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense peak for MFU (default: looked up from the device name)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override a workload field, e.g. --set layers=2 hidden=128 steps=6")
    parser.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides for our side only, e.g. --ours module.length_groups=1 (recorded)")
    parser.add_argument("--out", type=Path, default=None, help="default outputs/bench/<time>[-quick]")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run before it counts as failed")
    parser.add_argument("--plan", action="store_true", help="print the runs and exit")
    parser.add_argument("--report", type=Path, default=None, metavar="DIR",
                        help="print the table again from DIR/runs.jsonl (e.g. after runs added with the same --out)")
    parser.add_argument("--profile", action="store_true",
                        help="profile the first timed step of each run with torch.profiler (jobs/*.profile.txt); "
                             "that step's timing is distorted")
    return parser.parse_args(argv)


def build_workload(args: argparse.Namespace) -> Workload:
    w = Workload()
    if args.quick:
        w = dataclasses.replace(w, **QUICK)
    if args.threads is not None:
        w = dataclasses.replace(w, threads=args.threads)
    w = w.with_overrides(args.set)
    w.check()
    return w


def write_inputs(w: Workload, out: Path) -> dict[str, Path]:
    """The model folder and the rows, once for every run."""
    from zephyr_lit.assets import TINY_MODEL, asset_path

    model_dir = write_model_folder(w, out / "model", Path(asset_path(TINY_MODEL)))
    data_dir = out / "workload"
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {"model": model_dir}
    for kind, rows in (("dpo", dpo_rows(w)), ("sft", sft_rows(w))):
        path = data_dir / f"{kind}.json"
        path.write_text(json.dumps(rows))
        files[kind] = path
    (out / "workload.json").write_text(json.dumps(w.to_dict(), indent=2) + "\n")
    return files


def worker_env(w: Workload) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(w.threads),
        "MKL_NUM_THREADS": str(w.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p),
    })
    return env


def plan_runs(cases, repeats: int, sides: list[str]) -> list[tuple[int, object, str]]:
    """``(repeat, case, side)`` in run order: ours and TRL back to back, the first side alternating."""
    runs = []
    for repeat in range(repeats):
        order = sides if repeat % 2 == 0 else list(reversed(sides))
        for case in cases:
            runs += [(repeat, case, side) for side in order]
    return runs


def run_one(job: dict, out: Path, env: dict, timeout: float | None) -> dict:
    name = f"{job['case']['name']}-{job['side']}-r{job['repeat']}"
    jobs = out / "jobs"
    jobs.mkdir(exist_ok=True)
    job_path, result_path, log_path = jobs / f"{name}.json", jobs / f"{name}.result.json", jobs / f"{name}.log"
    job["work_dir"] = str(jobs / name)
    job_path.write_text(json.dumps(job, indent=2) + "\n")
    started = time.perf_counter()
    with log_path.open("w") as log:
        try:
            subprocess.run([sys.executable, "-m", "zephyr_lit.bench.worker", str(job_path), str(result_path)],
                           env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            pass
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        result = {"side": job["side"], "case": job["case"]["name"], "repeat": job["repeat"],
                  "error": f"no result after {time.perf_counter() - started:.0f} s (timeout or crash); see {log_path}"}
    result["wall_s"] = time.perf_counter() - started
    result["log"] = str(log_path)
    return result


def progress_line(index: int, total: int, result: dict) -> str:
    head = f"[{index}/{total}] {result['case']} {result['side']} r{result['repeat']}"
    if "error" in result:
        return f"{head}: FAILED ({result['error'].strip().splitlines()[-1]}) log: {result['log']}"
    unit = "pairs" if result["case"].startswith("dpo") else "seq"
    return (f"{head}: {result['rows_per_s']:.3g} {unit}/s, {result['tokens_per_s']:.0f} tok/s, "
            f"peak RSS {result['peak_rss_mib']:.0f} MiB, setup {result['setup_s']:.1f} s, {result['wall_s']:.0f} s in all")


def estimate_full(runs: list[dict], quick: Workload, repeats: int = 3) -> float | None:
    """A rough wall time of the full run from quick runs: per run, imports and set-up (the reference
    precompute scaled to the rows the full run reads) plus the full run's steps at the measured pace."""
    full = dataclasses.replace(quick, **{key: getattr(Workload(), key) for key in QUICK})
    total = 0.0
    for r in runs:
        if "error" in r:
            return None
        kind = "dpo" if r["case"].startswith("dpo") else "sft"
        step_s = r["timed_s"] / r["timed_steps"]
        steps = full.steps if full.steps is not None else rows_needed(full, kind) // (full.pair_batch if kind == "dpo" else full.sft_batch)
        precompute = "precompute" in r["case"] or r["case"] == "dpo-best"
        setup = r["setup_s"] * (rows_needed(full, kind) / rows_needed(quick, kind) if precompute else 1.0)
        total += r["import_s"] + setup + steps * step_s
    return total * repeats


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return report_only(args.report.resolve(), args.peak_tflops)
    w = build_workload(args)
    cases = select_cases(args.cases)
    repeats = args.repeats or (1 if args.quick else 3)
    runs = plan_runs(cases, repeats, args.sides)
    if args.plan:
        for repeat, case, side in runs:
            print(f"r{repeat} {case.name} {side}")
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device here", file=sys.stderr)
            return 2
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S") + ("-quick" if args.quick else "")
    out = (args.out or Path("outputs") / "bench" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "workload.json"
    if previous.exists() and json.loads(previous.read_text()) != w.to_dict():
        print(f"{out} holds runs of another workload; choose another --out", file=sys.stderr)
        return 2
    files = write_inputs(w, out)
    env = worker_env(w)
    (out / "meta.json").write_text(json.dumps({"device": args.device, "quick": args.quick, "repeats": repeats,
                                               "argv": sys.argv[1:] if argv is None else argv}) + "\n")
    print(f"zephyr-lit vs TRL: {describe_model(w)}; {args.device}, {w.threads} threads; "
          f"{len(runs)} runs ({repeats} repeat(s)); out: {out}", flush=True)

    results = []
    runs_path = out / "runs.jsonl"
    for index, (repeat, case, side) in enumerate(runs, start=1):
        job = {"side": side, "case": case.to_dict(), "repeat": repeat, "device": args.device,
               "workload": w.to_dict(), "model_dir": str(files["model"]), "rows_file": str(files[case.kind]),
               "ours_overrides": list(args.ours)}
        if case.same_batches:  # both read rows in order: give both only the rows the steps reach
            job["row_limit"] = rows_needed(w, case.kind)
        if args.profile:
            job["profile_step"] = w.warmup
            job["profile_path"] = str(out / "jobs" / f"{case.name}-{side}-r{repeat}.profile.txt")
        result = run_one(job, out, env, args.timeout)
        results.append(result)
        with runs_path.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        print(progress_line(index, len(runs), result), flush=True)

    render(out, results, w, args.device, repeats, cases, args.quick, args.peak_tflops)
    if args.profile:
        print("\nprofiles (timings of the profiled step are distorted):")
        for path in sorted((out / "jobs").glob("*.profile.txt")):
            print(f"  {path}")
    print(f"\nraw runs: {runs_path}\nsummary: {out / 'summary.json'}")
    return 0 if all("error" not in r for r in results) else 1


def render(out: Path, results: list[dict], w: Workload, device: str, repeats: int, cases, quick: bool,
           peak_arg: float | None) -> str:
    """Print the table of ``results`` and write ``table.txt``, ``runs.csv`` and ``summary.json``."""
    mode = (f"{'quick' if quick else 'full'}: {w.pairs} pairs / {w.sequences} sequences, {w.warmup} warm-up + "
            f"{'the rest of one epoch' if w.steps is None else w.steps - w.warmup} timed steps, {repeats} repeat(s)")
    device_name = next((r["device_name"] for r in results if r.get("device_name")), None)
    peak = peak_arg or (peak_tflops(device_name, w.dtype) if device_name else None)
    compute_params = parameter_count(w)["compute"]
    summaries = [summarise_case(case, results, compute_params, peak) for case in cases]
    versions = _versions()
    codes = sorted({r["code"] for r in results if r.get("code")})
    versions["zephyr-lit code"] = codes
    header = (f"zephyr-lit {'/'.join(codes) or '?'} vs TRL {versions.get('trl', '?')} | {device}"
              f"{' (' + device_name + ')' if device_name else ''}, {w.threads} threads | {describe_model(w)} | "
              f"{mode} | medians")
    if len(codes) > 1:
        header += f"\nWARNING: the code changed between runs ({', '.join(codes)}): see runs.jsonl 'code'"
    checks = check_targets(summaries, cuda=device == "cuda")
    table = format_table(summaries, header, cuda=device == "cuda") + "\n\n" + format_targets(checks)
    table += "\n\n" + format_legend(cases)
    if device == "cuda":
        table += f"\nMFU = 6 x {compute_params / 1e6:.1f}M params (all but the input embedding) x tok/s / " \
                 f"{peak if peak else '?'} TFLOP/s peak ({w.dtype})."
    if quick:
        estimate = estimate_full(results, w)
        if estimate is not None:
            table += (f"\n\nEstimated full run (same settings, 3 repeats of {Workload().steps} steps, at these rates): "
                      f"~{estimate / 60:.0f} min")
    print("\n" + table)
    (out / "table.txt").write_text(table + "\n")
    write_csv(out / "runs.csv", results)
    summary = {"workload": w.to_dict(), "device": device, "device_name": device_name, "peak_tflops": peak,
               "params": parameter_count(w), "repeats": repeats, "versions": versions,
               "host": platform.node(), "cases": summaries, "targets": checks}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    return table


def report_only(out: Path, peak_arg: float | None) -> int:
    """``--report DIR``: the table again from ``DIR/runs.jsonl`` (every case found there)."""
    meta = json.loads((out / "meta.json").read_text())
    w = Workload.from_dict(json.loads((out / "workload.json").read_text()))
    results = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines() if line.strip()]
    found = {r["case"] for r in results}
    cases = [case for case in select_cases(None) if case.name in found]
    repeats = max(r["repeat"] for r in results) + 1 if results else 0
    render(out, results, w, meta["device"], repeats, cases, meta["quick"], peak_arg)
    return 0


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "lightning", "trl", "accelerate", "datasets", "zephyr-lit"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
