"""Timing and memory, the same way for both trainers.

Each trainer reports every micro-batch (real tokens, rows: pairs for DPO, sequences for SFT, even
packed or flattened ones; the loss it returned) and the end of every optimizer
step (after the optimizer and scheduler stepped) to a ``StepRecorder``. Throughput is measured from
the end of the last warm-up step to the end of the last step, so it includes everything the trainer
does between steps (data loading, collation, logging), and only real (non-pad) tokens count.
"""

from __future__ import annotations

import resource
import subprocess
import time
from dataclasses import dataclass, field


@dataclass
class StepRecorder:
    cuda: bool = False
    profile_step: int | None = None  # profile this optimizer step (0-based) with torch.profiler
    profile_path: str | None = None
    steps: list[dict] = field(default_factory=list)
    train_start: float | None = None
    threads: int | None = None
    _tokens: int = 0
    _rows: int = 0
    _loss: float = 0.0
    _micro: int = 0

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        """Training begins (after models, data and any reference precompute are ready)."""
        import torch

        self.threads = torch.get_num_threads()
        self.train_start = self._now()
        if self.profile_step == 0:
            self._start_profiler()

    def micro(self, tokens: int, rows: int, loss: float) -> None:
        self._tokens += int(tokens)
        self._rows += int(rows)
        self._loss += float(loss)
        self._micro += 1

    def step_end(self) -> None:
        self.steps.append({"t": self._now(), "tokens": self._tokens, "rows": self._rows,
                           "loss": self._loss, "micro_batches": self._micro})
        self._tokens = self._rows = self._micro = 0
        self._loss = 0.0
        if self.profile_step is not None:
            if len(self.steps) == self.profile_step:
                self._start_profiler()
            elif len(self.steps) == self.profile_step + 1:
                self._stop_profiler()

    def _start_profiler(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._profiler = profile(activities=activities, record_shapes=True)
        self._profiler.__enter__()

    def _stop_profiler(self) -> None:
        self._profiler.__exit__(None, None, None)
        averages = self._profiler.key_averages()
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        text = averages.table(sort_by=sort, row_limit=30, max_name_column_width=70)
        shapes = self._profiler.key_averages(group_by_input_shape=True).table(
            sort_by=sort, row_limit=45, max_name_column_width=50, max_shapes_column_width=60)
        if self.profile_path:
            with open(self.profile_path, "w") as handle:
                handle.write(f"step {self.profile_step}, by op:\n{text}\n\nby op and input shapes:\n{shapes}\n")


def summarise(steps: list[dict], warmup: int, train_start: float | None = None) -> dict:
    """Tokens/s and rows/s over the steps after ``warmup``, and each step's duration.

    ``steps``: ``{t, tokens, rows, loss}`` per optimizer step, ``t`` taken at the step's end.
    """
    if len(steps) <= warmup:
        raise ValueError(f"{len(steps)} optimizer steps ran, none left to time after {warmup} warm-up steps")
    origin = steps[warmup - 1]["t"] if warmup > 0 else train_start
    if origin is None:
        raise ValueError("warmup=0 needs the training start time")
    timed = steps[warmup:]
    elapsed = timed[-1]["t"] - origin
    tokens = sum(s["tokens"] for s in timed)
    rows = sum(s["rows"] for s in timed)
    previous = [origin] + [s["t"] for s in timed[:-1]]
    return {
        "timed_steps": len(timed),
        "timed_s": elapsed,
        "tokens": tokens,
        "rows": rows,
        "tokens_per_s": tokens / elapsed,
        "rows_per_s": rows / elapsed,
        "step_s": [s["t"] - p for s, p in zip(timed, previous)],
        "losses": [s["loss"] for s in steps],
    }


def peak_rss_mib() -> float:
    """This process's peak resident set size over its whole life (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_peak_mib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


# Dense peak TFLOP/s by GPU name and the dtype the matmuls run in (fp32 without TF32: CUDA cores).
PEAK_TFLOPS = {
    ("H200", "float32"): 67.0, ("H200", "bfloat16"): 989.0,
    ("H100", "float32"): 67.0, ("H100", "bfloat16"): 989.0,  # SXM; PCIe: 51 / 756
    ("A100", "float32"): 19.5, ("A100", "bfloat16"): 312.0,
    ("L40S", "float32"): 91.6, ("L40S", "bfloat16"): 362.0,
}


def peak_tflops(device_name: str, dtype: str) -> float | None:
    for (name, kind), value in PEAK_TFLOPS.items():
        if name in device_name and kind == dtype:
            if name == "H100" and "PCIe" in device_name:
                return 51.0 if dtype == "float32" else 756.0
            return value
    return None


def mfu(compute_params: int, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: ``6 * params * tokens/s`` (forward and backward of the trained model,
    no attention term, no reference forward) over the peak."""
    if not peak:
        return None
    return 6 * compute_params * tokens_per_s / (peak * 1e12)


def code_version(repo: str) -> str | None:
    """The last commit that changed the package or the configs (the bench itself aside), ``+dirty``
    when they differ from it: the benchmark may run while the code changes, so each run records it."""
    try:
        commit = subprocess.run(["git", "-C", repo, "log", "-1", "--format=%h", "--", "zephyr_lit", "conf",
                                 ":(exclude)zephyr_lit/bench"], capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "zephyr_lit", "conf",
                                ":(exclude)zephyr_lit/bench"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")
