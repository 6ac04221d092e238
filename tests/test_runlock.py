"""One medfusion run per folder: the lock refuses a second process, survives kill -9, is shared by
the processes of one distributed run and re-entrant within a process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from medfusion import runlock
from medfusion.runlock import LOCK_NAME, RunLockError, launcher_run_id, run_lock

LAUNCHER = ("WORLD_SIZE", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")

# holds argv[1] for argv[2] seconds; says "held" once it has the lock
HOLD = """
import sys, time
from medfusion.runlock import run_lock
with run_lock(sys.argv[1], "holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""
# holds the lock file the way a holder does before it has written its JSON; writes it after argv[2] s
HOLD_SILENT = """
import fcntl, json, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".medfusion.lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
info = {"pid": os.getpid(), "host": sys.argv[3], "since": "now", "command": sys.argv, "run_id": sys.argv[4]}
os.ftruncate(fd, 0)
os.pwrite(fd, json.dumps(info).encode(), 0)
time.sleep(30)
"""


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """The test process is no part of a distributed run unless a test says so."""
    for name in LAUNCHER:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def helpers():
    """Start helper processes; each is killed at the end of the test."""
    started: list[subprocess.Popen] = []

    def start(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        environ = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
        environ |= {"OMP_NUM_THREADS": "1", **(env or {})}
        process = subprocess.Popen(
            [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=environ
        )
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def _distributed(monkeypatch, run_id: str, port: str = "29511") -> dict:
    env = {"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": run_id, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def test_a_second_process_is_refused_with_the_holder_named(tmp_path, helpers):
    run = tmp_path / "run"
    holder = helpers(HOLD, str(run), "30")
    info = json.loads((run / LOCK_NAME).read_text())
    assert info["pid"] == holder.pid and info["what"] == "holder" and info["command"][0] == "-c"
    with pytest.raises(RunLockError) as refused, run_lock(run, "medfusion train-vae"):
        pytest.fail("the second process got the lock")
    message = str(refused.value)
    assert message.startswith(f"{run} is in use by another medfusion run: pid {holder.pid} on host ")
    assert socket.gethostname() in message and info["since"] in message and "(command -c " in message
    assert message.endswith("wait for it to finish, or choose another folder")
    assert refused.value.holder["pid"] == holder.pid
    assert (run / LOCK_NAME).is_file()  # the refused process leaves the holder's file alone


def test_a_holder_killed_with_sigkill_is_taken_over(tmp_path, helpers):
    run = tmp_path / "run"
    holder = helpers(HOLD, str(run), "30")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (run / LOCK_NAME).is_file()  # left behind, but no longer locked
    lines: list[str] = []
    with run_lock(run, "medfusion train-vae", log=lines.append):
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(lines) == 1 and "taking over" in lines[0] and f"pid {holder.pid}" in lines[0]
    assert not (run / LOCK_NAME).exists()  # released: removed, since it was ours


def test_released_lock_is_removed_and_free_again(tmp_path, helpers):
    run = tmp_path / "run"
    run.mkdir()
    holder = helpers(HOLD, str(run), "0")
    assert holder.wait() == 0
    assert list(run.iterdir()) == []
    with run_lock(run, "next"):
        pass
    assert run.is_dir() and list(run.iterdir()) == []  # an existing folder stays


def test_processes_of_one_distributed_run_share_it(tmp_path, helpers, monkeypatch):
    run = tmp_path / "run"
    env = _distributed(monkeypatch, "job-1")
    helpers(HOLD, str(run), "30", env=env)
    with run_lock(run, "rank 1"):  # the same run id: goes on
        assert json.loads((run / LOCK_NAME).read_text())["what"] == "holder"
    assert (run / LOCK_NAME).is_file()  # a sharing process does not remove the holder's file


@pytest.mark.parametrize(
    "other",
    [
        {"TORCHELASTIC_RUN_ID": "job-2"},  # another run
        {"MASTER_PORT": "29512"},  # another launcher
        {"WORLD_SIZE": "1"},  # a single process
    ],
)
def test_another_distributed_run_is_refused(tmp_path, helpers, monkeypatch, other):
    run = tmp_path / "run"
    helpers(HOLD, str(run), "30", env=_distributed(monkeypatch, "job-1"))
    for name, value in other.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RunLockError, match="in use by another medfusion run"), run_lock(run, "other"):
        pass


def test_a_sharing_process_waits_for_the_holder_to_write_its_info(tmp_path, helpers, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    run_id = launcher_run_id(_distributed(monkeypatch, "job-1"))
    helpers(HOLD_SILENT, str(run), "0.4", socket.gethostname(), run_id)
    with run_lock(run, "rank 1"):
        pass


def test_a_stale_file_of_a_dead_process_is_not_taken_for_the_holder(tmp_path, helpers, monkeypatch):
    """The new holder has the lock but has not yet overwritten the info of the killed run before it."""
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "since": "then", "run_id": "old"}
    (run / LOCK_NAME).write_text(json.dumps(stale))
    run_id = launcher_run_id(_distributed(monkeypatch, "job-1"))
    helpers(HOLD_SILENT, str(run), "0.4", socket.gethostname(), run_id)
    with run_lock(run, "rank 1"):
        pass


def test_a_holder_that_never_says_who_it_is_is_reported(tmp_path, helpers, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    helpers(HOLD_SILENT, str(run), "30", "host", "")
    monkeypatch.setattr(runlock, "HOLDER_WAIT_SECONDS", 0.2)
    with pytest.raises(RunLockError, match="does not say which process holds it"), run_lock(run, "x"):
        pass


def test_reentrant_in_one_process_and_nested_folders_are_independent(tmp_path):
    out = tmp_path / "demo"
    with run_lock(out, "medfusion demo"):
        with run_lock(out / "autoencoder", "medfusion train-vae"):
            assert (out / "autoencoder" / LOCK_NAME).is_file()
        with run_lock(out, "medfusion train"):  # the same folder again: no error, still held
            pass
        assert json.loads((out / LOCK_NAME).read_text())["what"] == "medfusion demo"
        (out / "kept.txt").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]


def test_a_folder_created_for_the_lock_is_removed_when_left_empty(tmp_path):
    with pytest.raises(KeyError), run_lock(tmp_path / "a" / "run", "x"):
        raise KeyError("failed before writing anything")
    assert not (tmp_path / "a" / "run").exists()


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"), run_lock(tmp_path / "file", "x"):
        pass


def test_without_fcntl_it_does_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "fcntl", None)
    with run_lock(tmp_path / "run", "x"):
        pass
    assert not (tmp_path / "run").exists()


def test_launcher_run_id():
    assert launcher_run_id({}) == ""
    assert launcher_run_id({"WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "x"}) == ""
    assert launcher_run_id({"WORLD_SIZE": "2"}) == ""
    two = {"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert launcher_run_id(two) == "x/h/1"
    assert launcher_run_id({**two, "MASTER_PORT": "2"}) != launcher_run_id(two)


def test_lock_file_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with run_lock(tmp_path / "run", "x"):
            mode = (Path(tmp_path / "run") / LOCK_NAME).stat().st_mode & 0o777
    finally:
        os.umask(old)
    assert mode == 0o640


def test_the_lock_file_does_not_make_a_folder_look_used(tmp_path):
    """The demo wants a new or empty --out: a folder holding only its lock (or a stale one) is."""
    from medfusion.workflows import demo

    out = tmp_path / "out"
    with run_lock(out, "medfusion demo"):
        demo.check_out(out, force=False)
    out.mkdir()
    (out / LOCK_NAME).write_text("{}")  # left by a killed run
    demo.check_out(out, force=False)
