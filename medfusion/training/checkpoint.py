"""A folder of training checkpoints, ``RUN/checkpoints/step_000030/``, written atomically.

Each checkpoint is a folder filled by a caller-supplied ``write(folder)`` inside a hidden temporary
folder; the manager then writes the manifest ``checkpoint.json`` last (step, medfusion version, time,
and the size and sha256 of every file) and renames the folder into place. A folder whose manifest is
missing or disagrees with the files is reported and skipped by :meth:`CheckpointManager.latest_valid`.

Only one process (the main one) may save into a given root at a time: :meth:`CheckpointManager.save`
removes hidden temporary folders that it finds there, assuming they were left by a killed run.

A write that fails (a full disk, a quota) raises an ``OSError`` naming the checkpoint folder, and
the earlier checkpoints stay as they were.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from medfusion import __version__
from medfusion.training.state_io import CheckpointError
from medfusion.utils import PathError, atomic_dir, atomic_write_text

__all__ = ["MANIFEST_NAME", "CheckpointError", "CheckpointManager"]

MANIFEST_NAME = "checkpoint.json"
_MANIFEST_FORMAT = "medfusion.checkpoint"
_FOLDER_RE = re.compile(r"step_(\d+)")
_STALE_RE = re.compile(r"\.step_\d+\.")  # atomic_dir temporaries, replaced and half-deleted folders
_CHUNK_BYTES = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _step_of(name: str) -> int | None:
    match = _FOLDER_RE.fullmatch(name)
    return int(match.group(1)) if match else None


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _write_manifest(folder: Path, step: int) -> None:
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative == MANIFEST_NAME:
            raise ValueError(f"write() created {MANIFEST_NAME}; that name is reserved for the manifest")
        files.append({"path": relative, "size": path.stat().st_size, "sha256": _sha256(path)})
    manifest = {
        "format": _MANIFEST_FORMAT,
        "step": step,
        "medfusion_version": __version__,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")


def _manifest_problems(manifest: Any) -> list[str]:
    """Problems with the structure of a parsed manifest (not with the files it lists)."""
    if not isinstance(manifest, dict) or manifest.get("format") != _MANIFEST_FORMAT:
        return [f"{MANIFEST_NAME} is not a {_MANIFEST_FORMAT} manifest"]
    step, files = manifest.get("step"), manifest.get("files")
    if type(step) is not int or not isinstance(files, list):
        return [f"{MANIFEST_NAME} is malformed: needs an int 'step' and a list 'files'"]
    for entry in files:
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and type(entry.get("size")) is int
            and isinstance(entry.get("sha256"), str)
        )
        if not ok:
            return [f"{MANIFEST_NAME} is malformed: bad file entry {entry!r:.200}"]
        relative = PurePosixPath(entry["path"])
        if relative.is_absolute() or ".." in relative.parts or entry["path"] in ("", "."):
            return [f"{MANIFEST_NAME} lists a path outside the checkpoint: {entry['path']!r}"]
    return []


def _file_problems(folder: Path, entry: dict[str, Any]) -> list[str]:
    name, path = entry["path"], folder / entry["path"]
    if not path.is_file():
        return [f"file {name} missing"]
    try:
        size = path.stat().st_size
        if size != entry["size"]:
            return [f"file {name} is {size} bytes, manifest says {entry['size']}"]
        if _sha256(path) != entry["sha256"]:
            return [f"sha256 mismatch for {name}"]
    except OSError as err:
        return [f"file {name} unreadable: {err}"]
    return []


def _save_failure(final: Path, error: OSError, earlier: bool) -> PathError:
    reason = error.strerror or str(error)
    if not reason.startswith("cannot write"):
        reason = f"cannot write: {reason}"
    note = "; the earlier checkpoints are kept" if earlier else ""
    return PathError(error.errno or errno.EIO, f"{reason}{note}", str(final))


class CheckpointManager:
    """The checkpoints of one run, ``root/step_<step:06d>/``, each with a ``checkpoint.json`` manifest.

    Args:
        root: the folder that holds the checkpoint folders (created on the first save).
        keep_last: how many of the newest checkpoints :meth:`save` keeps (the one it has just
            written always stays); ``None`` keeps all.
    """

    def __init__(self, root: str | os.PathLike, keep_last: int | None = None) -> None:
        if keep_last is not None and (type(keep_last) is not int or keep_last < 1):
            raise ValueError(f"keep_last must be None or an int >= 1, got {keep_last!r}")
        self.root = Path(root)
        self.keep_last = keep_last

    def folder(self, step: int) -> Path:
        """The folder of the checkpoint at ``step`` (which may not exist)."""
        return self.root / f"step_{step:06d}"

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Write the checkpoint for ``step`` atomically, then delete checkpoints beyond ``keep_last``.

        Args:
            step: the training step (an int >= 0); an existing checkpoint for it is replaced.
            write: called with an empty temporary folder to fill with any files and subfolders
                (not ``checkpoint.json``, which the manager writes last).

        Returns:
            The final checkpoint folder. If ``write`` raises, the exception propagates and neither
            the temporary folder nor a folder under the final name remains (an existing checkpoint
            for ``step`` is kept).

        Raises:
            OSError: a write failed (a full disk, no permission; safetensors' errors included): a
                :class:`~medfusion.utils.PathError` naming the checkpoint folder.
        """
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        final = self.folder(step)
        earlier = bool(self.list())
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            with atomic_dir(final, overwrite=True) as tmp:
                write(tmp)
                _write_manifest(tmp, step)
        except OSError as error:  # atomic_dir names the file, a temporary one: name the checkpoint
            raise _save_failure(final, error, earlier) from error
        self._prune(keep=final)
        return final

    def list(self) -> list[Path]:
        """The checkpoint folders (named ``step_<digits>``, temporaries excluded), oldest step first.

        A listed folder may still be invalid: use :meth:`validate` or :meth:`latest_valid`.
        """
        if not self.root.is_dir():
            return []
        found = [(_step_of(p.name), p) for p in self.root.iterdir() if p.is_dir()]
        return [path for step, path in sorted((s, p) for s, p in found if s is not None)]

    def validate(self, folder: str | os.PathLike) -> list[str]:
        """Check a checkpoint folder against its manifest.

        Returns:
            The problems found (empty when valid): manifest missing or unparseable, its step
            different from the folder name's, a listed file missing or with the wrong size or sha256.
        """
        folder = Path(folder)
        if not folder.is_dir():
            return [f"folder {folder} missing"]
        manifest_path = folder / MANIFEST_NAME
        if not manifest_path.is_file():
            return [f"{MANIFEST_NAME} missing (incomplete write?)"]
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return [f"{MANIFEST_NAME} unreadable or not valid JSON: {err}"]
        problems = _manifest_problems(manifest)
        if problems:
            return problems
        folder_step = _step_of(folder.name)
        if folder_step is None:
            problems.append(f"folder name {folder.name!r} is not step_<digits>")
        elif manifest["step"] != folder_step:
            problems.append(f"{MANIFEST_NAME} says step {manifest['step']}, folder name says {folder_step}")
        for entry in manifest["files"]:
            problems.extend(_file_problems(folder, entry))
        return problems

    def latest_valid(self, log: Callable[[str], None] | None = None) -> tuple[Path, int] | None:
        """The newest valid checkpoint, reporting (and skipping) each newer invalid one.

        Args:
            log: receives one message per invalid checkpoint, naming the folder, its problems and
                the fallback; default ``warnings.warn``.

        Returns:
            ``(folder, step)``, or ``None`` if there is no checkpoint at all.

        Raises:
            CheckpointError: checkpoints exist but none is valid (lists each folder and its problems).
        """
        log = _warn if log is None else log
        folders = self.list()
        report = []
        for index in range(len(folders) - 1, -1, -1):
            folder = folders[index]
            problems = self.validate(folder)
            if not problems:
                return folder, _step_of(folder.name)
            report.append(f"{folder}: {'; '.join(problems)}")
            if index > 0:
                log(f"{report[-1]}; falling back to the previous checkpoint {folders[index - 1].name}")
            else:
                log(f"{report[-1]}; no earlier checkpoint to fall back to")
        if report:
            raise CheckpointError(f"no valid checkpoint in {self.root}:\n" + "\n".join(report))
        return None

    def _remove_stale(self) -> None:
        for path in self.root.iterdir():
            if path.is_dir() and _STALE_RE.match(path.name):
                shutil.rmtree(path, ignore_errors=True)

    def _prune(self, keep: Path) -> None:
        if self.keep_last is None:
            return
        for folder in self.list()[: -self.keep_last]:
            if folder != keep:
                doomed = folder.with_name(f".{folder.name}.deleting-{os.getpid()}")
                os.replace(folder, doomed)  # leave no half-deleted folder under a checkpoint name
                shutil.rmtree(doomed, ignore_errors=True)
