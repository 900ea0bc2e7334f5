"""One benchmark run in a fresh process: ``python -m zephyr_lit.bench.worker JOB.json RESULT.json``.

The job names the side (``ours`` or ``trl``), the case, the workload, the device and where the
rows and the model folder are. The result holds the per-step record, the throughput after warm-up,
the peak memory and the set-up time (models, data, reference precompute), or the error.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m zephyr_lit.bench.worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    result_path = Path(argv[1])
    started = time.perf_counter()
    result = {"side": job["side"], "case": job["case"]["name"], "repeat": job["repeat"], "pid": os.getpid()}
    try:
        from zephyr_lit.bench.measure import code_version

        result["code"] = code_version(str(Path(__file__).resolve().parents[2]))
        import torch

        torch.set_num_threads(job["workload"]["threads"])
        from zephyr_lit.bench.measure import StepRecorder, cuda_peak_mib, peak_rss_mib, summarise

        job["rows"] = json.loads(Path(job["rows_file"]).read_text())[: job.get("row_limit")]
        recorder = StepRecorder(cuda=job["device"] == "cuda", profile_step=job.get("profile_step"),
                                profile_path=job.get("profile_path"))
        if job["side"] == "ours":
            import lightning  # noqa: F401  (import time is not set-up time)

            from zephyr_lit.bench.ours import run_ours as run
        else:
            import trl  # noqa: F401

            from zephyr_lit.bench.trl_side import run_trl as run
        imported = time.perf_counter()
        info = run(job, recorder)
        result |= {
            "info": info,
            "threads": recorder.threads,
            "import_s": imported - started,
            "setup_s": recorder.train_start - imported,
            "total_s": time.perf_counter() - started,
            "steps": recorder.steps,
            **summarise(recorder.steps, job["workload"]["warmup"], recorder.train_start),
            "peak_rss_mib": peak_rss_mib(),
            "cuda_peak_mib": cuda_peak_mib() if job["device"] == "cuda" else None,
        }
        if job["device"] == "cuda":
            result["device_name"] = torch.cuda.get_device_name()
        code = 0
    except Exception:  # noqa: BLE001 - reported to the parent, which carries on with the other runs
        result["error"] = traceback.format_exc()
        code = 1
    tmp = result_path.with_name(result_path.name + ".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    os.replace(tmp, result_path)
    return code


if __name__ == "__main__":
    sys.exit(main())
