"""Small helpers shared across the package (kept here once, imported everywhere)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# torch.compile modes the commands accept
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# the largest seed a torch generator takes (seeds are unsigned 64-bit integers)
MAX_SEED = 2**64 - 1

# Compound suffixes that a format is recognised by; the longest match wins.
_COMPOUND_SUFFIXES = (".nii.gz", ".tar.gz")


def full_suffix(path: str | os.PathLike) -> str:
    """Return the format suffix of ``path``, lower-cased (``.nii.gz`` rather than ``.gz``)."""
    name = Path(path).name.lower()
    for suffix in _COMPOUND_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def inside(root: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """``root / relative``, checked to stay inside ``root`` (symbolic links followed).

    Every writer builds its output paths through this, so that a name read from a file (a class
    name, a manifest entry) can never make it write elsewhere.

    Raises:
        ValueError: ``relative`` is absolute, empty, or leads outside ``root``.
    """
    relative_text = os.fspath(relative)
    if not relative_text or os.path.isabs(relative_text) or "\0" in relative_text:
        raise ValueError(
            f"{root}: refusing to write {relative_text!r}: not a relative path inside the folder"
        )
    base = Path(root).resolve()
    target = (base / relative_text).resolve()
    if target == base or not target.is_relative_to(base):
        raise ValueError(
            f"{root}: refusing to write {relative_text!r}: it leads outside the folder ({target})"
        )
    return Path(root) / relative_text


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_file_modes(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything in it) the modes that the umask gives new
    files and folders: the one file mode policy of every writer (``mkstemp``, ``mkdtemp`` and
    safetensors' writer create owner-only files otherwise). Symbolic links are left alone."""
    mask = _umask()
    path = Path(path)
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for folder, dirs, files in os.walk(path):
        for name in dirs:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # a file stands where a folder goes
        blocking = next(
            (p for p in (path.parent, *path.parent.parents) if p.exists() and not p.is_dir()), None
        )
        raise write_error(path, f"{blocking or path.parent} is not a folder", errno.ENOTDIR) from e
    except OSError as e:
        raise _write_failure(e, path) from e


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; rename it onto ``path`` on success.

    The temporary name keeps the suffix of ``path`` so that writers which choose their format by
    suffix still work. If the body raises, the temporary file is removed and ``path`` is left
    untouched, so an interrupted write never leaves a half-written file under the final name.
    """
    path = Path(path)
    _make_parent(path)
    suffix = full_suffix(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    except OSError as e:  # no permission, no inodes left: named by the file meant
        raise _write_failure(e, path) from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates files readable by the owner only; give the result the usual mode.
        os.chmod(tmp_path, 0o666 & ~_umask())
        _fsync(tmp_path)  # the data is on disk before the name says the file is complete
        os.replace(tmp_path, path)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        failure = _write_failure(e, path)
        if failure is not None:
            raise failure from e
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; rename it onto ``path`` on success.

    Args:
        path: the final folder.
        overwrite: replace an existing ``path`` (it is removed only after the new folder is
            complete); otherwise an existing ``path`` raises ``FileExistsError``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    _make_parent(path)
    try:
        tmp_path = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _write_failure(e, path) from e
    try:
        yield tmp_path
        apply_file_modes(tmp_path)  # mkdtemp and some writers (safetensors) make them owner-only
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp_path, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, path)
    except BaseException as e:
        shutil.rmtree(tmp_path, ignore_errors=True)
        failure = _write_failure(e, path)
        if failure is not None:
            raise failure from e
        raise


def _write_failure(error: BaseException, path: Path) -> OSError | None:
    """The error to raise for ``error`` raised while writing ``path``: an ``OSError`` (a full
    disk, no permission) or safetensors' error becomes one that names ``path``; others stay."""
    if isinstance(error, PathError):
        return None
    if isinstance(error, OSError):
        return write_error(path, error.strerror or str(error), error.errno or errno.EIO)
    if type(error).__name__ == "SafetensorError":  # safetensors' writer on a full disk
        code = re.search(r"(?:os error|code:) (\d+)", str(error))  # its I/O errors carry the errno as text
        reason = str(error).strip() or "safetensors could not write the weights"
        return write_error(path, reason, int(code.group(1)) if code else errno.EIO)
    return None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_error(path: str | os.PathLike, reason: str, code: int = errno.EIO) -> OSError:
    """An ``OSError`` for a write to ``path`` that failed for ``reason``, saying how much room is
    left where it was written (a full disk is the usual cause). ``str(error)`` and the command
    line show ``path: reason``."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        hint = ""
    else:
        hint = f" (is the disk full? {free / 2**20:.1f} MiB free there)" if free < 2**30 else ""
    return PathError(code, f"cannot write: {reason}{hint}", str(path))


class PathError(OSError):
    """An ``OSError`` whose text is ``path: reason`` (the command line prints it as it is)."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}" if self.filename else str(self.strerror)


def cpu_only() -> bool:
    """True where work runs on CPUs (no accelerator, or ``ACCELERATE_USE_CPU``); Accelerate
    then uses the gloo backend for several processes (``torchrun``/``accelerate launch --cpu``)."""
    import torch
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    accelerator = getattr(torch, "accelerator", None)
    return not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available())


def process_state():
    """The process group of this run (one process, or one per GPU/CPU worker under a launcher),
    an ``accelerate.PartialState``."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_only())
