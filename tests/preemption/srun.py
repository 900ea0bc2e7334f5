"""A stand-in ``srun`` for one node: start ``ntasks`` copies of a command with the variables srun sets.

Usage: python tests/preemption/srun.py <ntasks> <log_dir> <command...>
Task ``r`` writes its output to ``<log_dir>/task<r>.log``; ``<log_dir>/exit_codes`` gets every task's
exit code (128 + N for a task killed by signal N), and this process exits with the highest, as srun
does. ``SLURM_JOB_ID`` (and ``SLURM_RESTART_COUNT``) come from the caller's environment. Signals that
reach this process (a task signalling its process group) are ignored here: the tasks got them too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def main(ntasks: int, log_dir: Path, command: list[str]) -> int:
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)  # a Python handler, not SIG_IGN: exec resets it for the tasks
    log_dir.mkdir(parents=True, exist_ok=True)
    tasks = []
    for rank in range(ntasks):
        env = {**os.environ, "SLURM_NTASKS": str(ntasks), "SLURM_NTASKS_PER_NODE": str(ntasks), "SLURM_NNODES": "1",
               "SLURM_NODELIST": "localhost", "SLURM_JOB_NAME": "zephyr", "SLURM_PROCID": str(rank),
               "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0"}
        with open(log_dir / f"task{rank}.log", "a") as log:
            tasks.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [task.wait() for task in tasks]
    codes = [128 - code if code < 0 else code for code in codes]
    (log_dir / "exit_codes").write_text(" ".join(map(str, codes)) + "\n")
    return max(codes)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]))
