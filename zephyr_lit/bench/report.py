"""Medians over repeats, ours/TRL ratios, the loss parity of same-batch cases, and the printed table."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from zephyr_lit.bench.cases import Case
from zephyr_lit.bench.measure import mfu
from zephyr_lit.bench.workload import median

SIDES = ("ours", "trl")
CSV_FIELDS = ("case", "side", "repeat", "rows_per_s", "tokens_per_s", "peak_rss_mib", "cuda_peak_mib",
              "setup_s", "import_s", "total_s", "timed_steps", "timed_s", "threads", "error")


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or not theirs or math.isnan(ours) or math.isnan(theirs):
        return None
    return ours / theirs


def loss_gap(ours: dict, theirs: dict) -> float | None:
    """Largest absolute difference of the per-step losses of two runs over the same batches."""
    a, b = ours.get("losses") or [], theirs.get("losses") or []
    if not a or len(a) != len(b):
        return None
    return max(abs(x - y) for x, y in zip(a, b))


def summarise_case(case: Case, runs: list[dict], compute_params: int, peak: float | None) -> dict:
    """Medians per side over the successful runs of ``case``; ratios ours/TRL; parity of repeat 0."""
    out: dict = {"case": case.name, "kind": case.kind, "title": case.title, "same_batches": case.same_batches}
    by_side = {side: [r for r in runs if r["case"] == case.name and r["side"] == side] for side in SIDES}
    for side, side_runs in by_side.items():
        ok = [r for r in side_runs if "error" not in r]
        stats = {"runs": len(side_runs), "ok": len(ok), "errors": [r["error"] for r in side_runs if "error" in r]}
        for key in ("rows_per_s", "tokens_per_s", "peak_rss_mib", "cuda_peak_mib", "setup_s"):
            values = [r[key] for r in ok if r.get(key) is not None]
            stats[key] = median(values) if values else None
            stats[f"{key}_all"] = values
        stats["mfu"] = mfu(compute_params, stats["tokens_per_s"], peak) if stats["tokens_per_s"] else None
        out[side] = stats
    for key in ("rows_per_s", "tokens_per_s", "peak_rss_mib", "cuda_peak_mib", "setup_s", "mfu"):
        out[f"{key}_ratio"] = ratio(out["ours"][key], out["trl"][key])
    out["loss_gap"] = None
    if case.same_batches:
        pairs = [(o, t) for o in by_side["ours"] for t in by_side["trl"]
                 if o["repeat"] == t["repeat"] and "error" not in o and "error" not in t]
        gaps = [g for g in (loss_gap(o, t) for o, t in pairs) if g is not None]
        out["loss_gap"] = max(gaps) if gaps else None
    return out


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_table(summaries: list[dict], header: str, cuda: bool) -> str:
    memory = "GPU max alloc MiB" if cuda else "peak RSS MiB"
    columns = [("case", 17), ("pairs|seq/s ours", 16), ("TRL", 7), ("ratio", 6), ("tok/s ours", 10), ("TRL", 7),
               ("ratio", 6), (f"{memory} ours", len(memory) + 5), ("TRL", 7), ("ratio", 6),
               ("setup s ours", 12), ("TRL", 6), ("max|dloss|", 10)]
    if cuda:
        columns += [("MFU ours", 8), ("TRL", 6)]
    lines = [header, "  ".join(name.rjust(width) if i else name.ljust(width) for i, (name, width) in enumerate(columns))]
    memory_key = "cuda_peak_mib" if cuda else "peak_rss_mib"
    for s in summaries:
        ours, trl = s["ours"], s["trl"]
        cells = [
            s["case"],
            _num(ours["rows_per_s"]), _num(trl["rows_per_s"]), _ratio(s["rows_per_s_ratio"]),
            _num(ours["tokens_per_s"]), _num(trl["tokens_per_s"]), _ratio(s["tokens_per_s_ratio"]),
            _num(ours[memory_key]), _num(trl[memory_key]), _ratio(s[f"{memory_key}_ratio"]),
            _num(ours["setup_s"]), _num(trl["setup_s"]),
            ("-" if s["loss_gap"] is None else f"{s['loss_gap']:.1e}") if s["same_batches"] else "n/a",
        ]
        if cuda:
            cells += [_num(ours["mfu"] and 100 * ours["mfu"], 2) + "%" if ours["mfu"] else "-",
                      _num(trl["mfu"] and 100 * trl["mfu"], 2) + "%" if trl["mfu"] else "-"]
        failed = [side for side in SIDES if s[side]["ok"] < s[side]["runs"]]
        line = "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, (_, w)) in enumerate(zip(cells, columns)))
        lines.append(line + (f"  FAILED: {', '.join(failed)}" if failed else ""))
    return "\n".join(lines)


TARGETS = (  # (what, ours/TRL throughput target, cases ours may pick from, cases TRL may pick from)
    ("DPO pairs/s, equal settings, online reference", 1.3, ("dpo-online",), ("dpo-online",)),
    ("DPO pairs/s, equal settings, precomputed reference", 1.3, ("dpo-precompute",), ("dpo-precompute",)),
    ("DPO pairs/s, our best settings vs TRL default", 2.0, ("dpo-best",), ("dpo-best",)),
    ("SFT tokens/s, our best vs TRL's best configuration", 1.2,
     ("sft-padded", "sft-padding-free", "sft-packed"), ("sft-padded", "sft-padding-free", "sft-packed")),
)


def check_targets(summaries: list[dict], cuda: bool) -> list[dict]:
    """The issue's acceptance ratios from the medians: for each target, the fastest of our cases over
    the fastest of TRL's (SFT compares tokens/s, DPO pairs/s), and peak memory of every case."""
    by_name = {s["case"]: s for s in summaries}
    checks = []
    for what, target, ours_cases, trl_cases in TARGETS:
        key = "rows_per_s" if ours_cases[0].startswith("dpo") else "tokens_per_s"
        ours = [(by_name[c]["ours"][key], c) for c in ours_cases if c in by_name and by_name[c]["ours"][key]]
        theirs = [(by_name[c]["trl"][key], c) for c in trl_cases if c in by_name and by_name[c]["trl"][key]]
        if not ours or not theirs:
            continue
        (best_ours, ours_case), (best_trl, trl_case) = max(ours), max(theirs)
        value = best_ours / best_trl
        checks.append({"what": what, "target": target, "ratio": value, "met": value >= target,
                       "ours_case": ours_case, "trl_case": trl_case})
    memory_key = "cuda_peak_mib" if cuda else "peak_rss_mib"
    for s in summaries:
        value = s.get(f"{memory_key}_ratio")
        if value is not None:
            checks.append({"what": f"peak memory, {s['case']}", "target": 1.0, "ratio": value, "met": value <= 1.0,
                           "ours_case": s["case"], "trl_case": s["case"]})
    return checks


def format_targets(checks: list[dict]) -> str:
    lines = ["targets (issue 5; medians of this run):"]
    for c in checks:
        sign = "<=" if c["what"].startswith("peak memory") else ">="
        picked = "" if c["ours_case"] == c["trl_case"] else f" (ours: {c['ours_case']}, TRL: {c['trl_case']})"
        lines.append(f"  {'met ' if c['met'] else 'MISSED'} {c['what']}: {c['ratio']:.2f}x, target {sign} "
                     f"{c['target']:g}x{picked}")
    return "\n".join(lines)


def format_legend(cases: list[Case]) -> str:
    lines = ["cases (ours | TRL):"]
    for case in cases:
        lines.append(f"  {case.name}: {case.title}")
        lines.append(f"      ours: {case.ours_label}")
        lines.append(f"      TRL:  {case.trl_label}")
    lines += [
        "ratio = ours/TRL (throughput: > 1 means ours is faster; memory: < 1 means ours uses less).",
        "pairs|seq/s: preference pairs (DPO) or sequences (SFT; a packed or padding-free row holds several).",
        "tok/s counts real (non-pad) tokens only; DPO rows count the prompt twice (chosen and rejected rows).",
        "setup s: models, data and any reference precompute, before the first step (not in the throughput).",
        "max|dloss|: largest per-step loss difference between the two trainers on the same batches "
        "(n/a: different batches).",
    ]
    return "\n".join(lines)


def write_csv(path: Path, runs: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for run in runs:
            row = {key: run.get(key) for key in CSV_FIELDS}
            error = (run.get("error") or "").strip().splitlines()
            row["error"] = error[-1] if error else ""
            writer.writerow(row)
