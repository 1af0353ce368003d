"""Run a Python script in its own process group with a hard time bound (SIGKILL on timeout)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent / "ddp_scripts"


def run_script(script: str, *args: str, timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    """``python SCRIPTS/script args...``; the whole group (DDP children too) dies on timeout.

    SIGTERM is not enough: Lightning catches it, and a rank stuck in a collective never
    returns to act on it.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)  # else Lightning thinks an outer launcher made the processes
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / script), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(
            f"{script} {args} did not finish in {timeout}s (hang?):\n{out[-3000:]}"
        ) from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftover children of a crashed rank 0
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
