"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_HOLD = """
import sys, time
from medfusion.runlock import run_lock
with run_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
"""
_LAUNCHER = ("WORLD_SIZE", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def lock_holder() -> Iterator[Callable[[Path, str], subprocess.Popen]]:
    """``lock_holder(folder, what)``: another process that holds ``folder``'s run lock (as a
    running medfusion command would) until the test ends; it is killed with SIGKILL then."""
    started: list[subprocess.Popen] = []

    def hold(folder: Path, what: str = "medfusion run") -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER} | {"OMP_NUM_THREADS": "1"}
        process = subprocess.Popen(
            [sys.executable, "-c", _HOLD, str(folder), what], stdout=subprocess.PIPE, text=True, env=env
        )
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield hold
    for process in started:
        process.kill()
        process.wait()
