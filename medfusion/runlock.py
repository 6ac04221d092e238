"""One medfusion run per output folder, across processes: :func:`run_lock`.

Two commands writing into one folder at once interleave their logs and overwrite each other's
models. So each command that writes a folder first takes ``FOLDER/.medfusion.lock``: an exclusive
``flock`` on that file, held while the command runs, with the holder's pid, host, start time,
command line and run id written into it as JSON. A second process is refused with an error that
says who holds the folder.

* The kernel drops the ``flock`` when its process ends, however it ends (``kill -9`` included), so
  a lock file left by a dead run is simply taken over (and a line says so).
* The processes of one distributed run (``torchrun`` / ``accelerate launch``, ``WORLD_SIZE > 1``)
  share the lock: one holds it, the others find the same run id (from the launcher's environment,
  see :func:`launcher_run_id`) in the file and go on.
* In one process the lock is re-entrant: a command that calls another into the same folder (the
  demo into its ``OUT``) takes it once, and nested locks on different folders are independent.
* The file is hidden (readers skip names starting with ``.``) and removed on release when it is
  still this lock's file. Where ``fcntl`` does not exist (Windows) the lock does nothing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; run_lock is a no-op there
    fcntl = None

__all__ = ["LOCK_NAME", "RunLockError", "launcher_run_id", "run_lock"]

LOCK_NAME = ".medfusion.lock"
HOLDER_WAIT_SECONDS = 10.0  # how long to wait for a holder to write its JSON
_POLL_SECONDS = 0.05
_MAX_COMMAND_CHARS = 300


class RunLockError(RuntimeError):
    """The folder is in use by another medfusion run.

    Attributes:
        folder: the locked folder.
        holder: what the lock file says about its holder (pid, host, since, command, run_id,
            what), or None when it names none.
    """

    def __init__(self, folder: Path, holder: Mapping | None):
        self.folder = folder
        self.holder = dict(holder) if holder is not None else None
        super().__init__(
            f"{folder} is in use by another medfusion run: {_describe(holder, folder)}; "
            "wait for it to finish, or choose another folder"
        )


def launcher_run_id(environ: Mapping[str, str] | None = None) -> str:
    """The id that the processes of one distributed run share, from the launcher's environment
    (``TORCHELASTIC_RUN_ID``, ``MASTER_ADDR``, ``MASTER_PORT``); ``""`` for a single process
    (``WORLD_SIZE`` unset or 1) or when the launcher set none of them."""
    environ = os.environ if environ is None else environ
    try:
        world_size = int(environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world_size = 1
    if world_size <= 1:
        return ""
    parts = [environ.get(name, "") for name in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")]
    return "/".join(parts) if any(parts) else ""


_held: dict[str, int] = {}  # real path of each folder locked here -> the pid that locked it
_held_guard = threading.Lock()


@contextlib.contextmanager
def run_lock(
    folder: str | os.PathLike, what: str, log: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold ``folder`` for this run: no other medfusion run may lock it until the block ends.

    Creates ``folder`` (and its parents) when missing; when it was created here and is empty at
    the end (the run failed before writing anything), it is removed again.

    Args:
        folder: the output folder.
        what: what this run is (e.g. ``"medfusion train-vae"``), written into the lock file.
        log: receives the line saying that a lock left by a dead process was taken over;
            default: standard error.

    Raises:
        RunLockError: another process holds the folder (and is not part of this distributed run);
            the message names its pid, host, start time and command line.
        NotADirectoryError: ``folder`` is a file.
    """
    if fcntl is None:
        yield
        return
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; give a folder for the run")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    with _held_guard:
        reentered = _held.get(key) == os.getpid()  # (a forked child does not hold its parent's)
        if not reentered:
            _held[key] = os.getpid()
    if reentered:  # the outer block of this process holds it and releases it
        yield
        return
    fd = None
    try:
        fd = _acquire(folder, what, log)
        yield
    finally:
        with _held_guard:
            _held.pop(key, None)
        if fd is not None:
            _release(folder / LOCK_NAME, fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty


def _acquire(folder: Path, what: str, log: Callable[[str], None] | None) -> int | None:
    """Lock ``folder``: the open, locked file descriptor, or None when sharing a distributed run's
    lock (or when the file system cannot lock)."""
    path = folder / LOCK_NAME
    run_id = launcher_run_id()
    deadline = time.monotonic() + HOLDER_WAIT_SECONDS
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # the folder was removed meanwhile (by a run releasing it)
            folder.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            if _settled(holder) or time.monotonic() > deadline:
                if run_id and holder is not None and holder.get("run_id") == run_id:
                    return None  # another process of this distributed run holds it
                raise RunLockError(folder, holder) from None
            time.sleep(_POLL_SECONDS)
            continue
        except OSError as error:  # a file system without locks (ENOLCK, EOPNOTSUPP ...)
            os.close(fd)
            warnings.warn(f"cannot lock {path} ({error}); going on without a lock", stacklevel=4)
            return None
        if not _same_file(path, fd):  # released and removed by its holder while we waited
            os.close(fd)
            continue
        _take(fd, folder, what, run_id, log)
        return fd


def _take(fd: int, folder: Path, what: str, run_id: str, log: Callable[[str], None] | None) -> None:
    previous = _read_holder(fd)
    if previous is not None and (previous.get("pid"), previous.get("host")) != (os.getpid(), _host()):
        message = (
            f"{folder}: taking over the lock left by a process that has ended ({_describe(previous, folder)})"
        )
        (log or (lambda line: print(line, file=sys.stderr)))(message)
    info = {
        "pid": os.getpid(),
        "host": _host(),
        "since": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": list(sys.argv),
        "run_id": run_id,
        "what": what,
    }
    data = (json.dumps(info) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _release(path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        if _same_file(path, fd):
            path.unlink()  # still ours: removed before unlocking; a waiter then finds it gone
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _same_file(path: Path, fd: int) -> bool:
    try:
        on_disk, opened = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)


def _read_holder(fd: int) -> dict | None:
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # empty (not written yet) or half-written
    return holder if isinstance(holder, dict) else None


def _settled(holder: dict | None) -> bool:
    """Whether ``holder`` describes the process that holds the lock now. It does not while the
    file is empty or still names a dead process on this host: the new holder has taken the lock
    but not yet written its JSON."""
    if holder is None:
        return False
    pid = holder.get("pid")
    if holder.get("host") != _host() or type(pid) is not int:
        return True
    return _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as error:  # EPERM: it exists, under another user
        return error.errno == errno.EPERM
    return True


def _host() -> str:
    return socket.gethostname()


def _describe(holder: Mapping | None, folder: Path) -> str:
    if holder is None:
        return f"its lock file {folder / LOCK_NAME} does not say which process holds it"
    command = holder.get("command")
    command = shlex.join(str(part) for part in command) if isinstance(command, list) else str(command)
    if len(command) > _MAX_COMMAND_CHARS:
        command = command[: _MAX_COMMAND_CHARS - 3] + "..."
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')} "
        f"(command {command})"
    )


def earlier_settings(out: Path, settings_file: str, force: bool, not_ours: str) -> dict | None:
    """The settings an earlier run left in ``out`` (its ``settings_file``, JSON), for the caller to
    compare with its own; None when there is nothing to compare: ``out`` is new or empty (but for
    its lock), or ``force`` emptied it.

    Raises:
        FileExistsError: ``out`` holds other files but no ``settings_file``: the ``not_ours`` message.
    """
    entries = [p for p in out.iterdir() if p.name != LOCK_NAME] if out.is_dir() else []
    if not entries:
        return None
    file = out / settings_file
    if not file.is_file():
        raise FileExistsError(not_ours)
    if force:
        for path in entries:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return None
    return json.loads(file.read_text(encoding="utf-8"))
