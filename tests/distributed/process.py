"""Run a multi-process command with a deadline: on timeout its whole process group is killed (the
ranks Lightning or torchrun started included), so a hang ends the test instead of the CI job."""

from __future__ import annotations

import os
import signal
import subprocess


def run_group(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, **kwargs)`` in a new session; past ``timeout`` s SIGKILL the session's group
    and raise ``subprocess.TimeoutExpired``. ``capture_output=True`` as for ``subprocess.run``."""
    if kwargs.pop("capture_output", False):
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with subprocess.Popen(cmd, start_new_session=True, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
        return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)
