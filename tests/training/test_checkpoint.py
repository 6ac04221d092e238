"""Tests for medfusion.training.checkpoint: atomic checkpoint folders with a verified manifest."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import medfusion
from medfusion.training import checkpoint as checkpoint_module
from medfusion.training.checkpoint import MANIFEST_NAME, CheckpointError, CheckpointManager
from medfusion.training.state_io import load_state, save_state
from medfusion.utils import atomic_path


def _writer(payload: bytes = b"weights"):
    """A ``write`` callback that fills a checkpoint with two files and a subfolder."""

    def write(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(payload * 10)
        (folder / "ema.safetensors").write_bytes(payload * 20)
        (folder / "optimizer").mkdir()
        (folder / "optimizer" / "state.json").write_text('{"lr": 0.1}')

    return write


def _names(root: Path) -> list[str]:
    """Every entry of ``root``, hidden ones included."""
    return sorted(p.name for p in root.iterdir())


def _flip_first_byte(path: Path) -> None:
    """Corrupt ``path`` without changing its size."""
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def manager(tmp_path) -> CheckpointManager:
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=None)
    for step in (30, 60):
        manager.save(step, _writer(f"step{step}".encode()))
    return manager


def test_save_writes_manifest_and_lists(tmp_path):
    manager = CheckpointManager(tmp_path / "run" / "checkpoints", keep_last=None)
    folder = manager.save(30, _writer())
    assert folder == tmp_path / "run" / "checkpoints" / "step_000030"
    assert _names(folder) == [MANIFEST_NAME, "ema.safetensors", "model.safetensors", "optimizer"]
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["step"] == 30 and manifest["medfusion_version"] == medfusion.__version__
    assert manifest["time"]
    files = {entry["path"]: entry for entry in manifest["files"]}
    assert sorted(files) == ["ema.safetensors", "model.safetensors", "optimizer/state.json"]
    data = (folder / "model.safetensors").read_bytes()
    assert files["model.safetensors"]["size"] == len(data)
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert manager.validate(folder) == []

    manager.save(5, _writer())
    manager.save(1000000, _writer())
    assert [p.name for p in manager.list()] == ["step_000005", "step_000030", "step_1000000"]
    assert manager.latest_valid() == (manager.folder(1000000), 1000000)


def test_keep_last_deletes_oldest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        manager.save(step, _writer())
    assert _names(tmp_path) == ["step_000020", "step_000030"]  # no hidden leftovers either


def test_keep_last_never_deletes_the_checkpoint_just_saved(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(50, _writer())
    manager.save(40, _writer())  # resumed from an earlier step
    assert _names(tmp_path) == ["step_000040", "step_000050"]


def test_save_replaces_existing_step(manager):
    manager.save(60, _writer(b"new"))
    assert (manager.folder(60) / "model.safetensors").read_bytes() == b"new" * 10
    assert manager.validate(manager.folder(60)) == []
    assert _names(manager.root) == ["step_000030", "step_000060"]


def test_exception_in_write_leaves_nothing(manager):
    def failing(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        manager.save(90, failing)
    with pytest.raises(RuntimeError, match="disk full"):
        manager.save(60, failing)  # the existing checkpoint for that step survives
    assert _names(manager.root) == ["step_000030", "step_000060"]
    assert manager.validate(manager.folder(60)) == []


FULL_DISK = [
    # what safetensors raises on a full disk: no path, the errno only inside the text
    SafetensorError(
        "Error while serializing: "
        'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    ),
    OSError(errno.ENOSPC, "No space left on device"),  # a Python write (no filename either)
]


@pytest.mark.parametrize("error", FULL_DISK, ids=["safetensors", "oserror"])
@pytest.mark.parametrize("where", ["atomic_path", "write"])
def test_a_full_disk_names_the_checkpoint_and_keeps_the_earlier_ones(manager, monkeypatch, error, where):
    # a full disk: utils.write_error adds its hint when little room is left
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**30, 2**30, 0))

    def failing(folder: Path) -> None:
        save_state({"w": torch.ones(3)}, folder / "optimizer_vae")
        if where == "write":
            raise error
        with atomic_path(folder / "model_vae.safetensors"):  # as the training loop writes weights
            raise error

    with pytest.raises(OSError) as info:
        manager.save(90, failing)
    folder = manager.folder(90)
    assert info.value.filename == str(folder)
    message = str(info.value)
    assert message.startswith(f"{folder}: cannot write: ") and "is the disk full?" in message
    assert message.endswith("; the earlier checkpoints are kept")
    assert _names(manager.root) == ["step_000030", "step_000060"]  # no half-written step_* left
    assert manager.latest_valid() == (manager.folder(60), 60)


def test_a_failed_first_checkpoint_leaves_nothing(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints")

    def failing(folder: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(OSError) as info:
        manager.save(1, failing)
    assert info.value.errno == errno.EACCES and "earlier" not in str(info.value)
    assert str(manager.folder(1)) in str(info.value) and _names(manager.root) == []


def test_stale_temp_folder_ignored_then_cleaned(manager):
    stale = manager.root / ".step_000090.k3j4h5.tmp"  # a run killed inside write()
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert [p.name for p in manager.list()] == ["step_000030", "step_000060"]
    assert manager.latest_valid() == (manager.folder(60), 60)
    manager.save(90, _writer())
    assert _names(manager.root) == ["step_000030", "step_000060", "step_000090"]


def test_truncated_file_falls_back_to_previous(manager):
    ema = manager.folder(60) / "ema.safetensors"
    size = ema.stat().st_size
    ema.write_bytes(ema.read_bytes()[:10])
    messages = []
    assert manager.latest_valid(log=messages.append) == (manager.folder(30), 30)
    assert len(messages) == 1
    assert f"step_000060: file ema.safetensors is 10 bytes, manifest says {size}" in messages[0]
    assert "falling back to the previous checkpoint step_000030" in messages[0]


def test_default_log_is_a_warning(manager):
    (manager.folder(60) / MANIFEST_NAME).unlink()
    with pytest.warns(UserWarning, match=r"step_000060: checkpoint\.json missing \(incomplete write\?\)"):
        assert manager.latest_valid() == (manager.folder(30), 30)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda f: (f / MANIFEST_NAME).unlink(), "checkpoint.json missing (incomplete write?)"),
        (lambda f: (f / MANIFEST_NAME).write_text("{"), "checkpoint.json unreadable or not valid JSON"),
        (lambda f: (f / MANIFEST_NAME).write_text("[]"), "checkpoint.json is not a medfusion.checkpoint"),
        (lambda f: (f / "optimizer" / "state.json").unlink(), "file optimizer/state.json missing"),
        (lambda f: _flip_first_byte(f / "model.safetensors"), "sha256 mismatch for model.safetensors"),
    ],
)
def test_validate_reports_problem(manager, damage, problem):
    folder = manager.folder(60)
    damage(folder)
    assert any(p.startswith(problem) for p in manager.validate(folder)), manager.validate(folder)


def test_wrong_step_in_manifest(manager):
    folder = manager.folder(60)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["step"] = 30
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert manager.validate(folder) == ["checkpoint.json says step 30, folder name says 60"]


def test_manifest_path_outside_folder(manager):
    folder = manager.folder(60)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["files"][0]["path"] = "../step_000030/model.safetensors"
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert manager.validate(folder)[0].startswith("checkpoint.json lists a path outside the checkpoint")


def test_all_corrupt_raises(manager):
    (manager.folder(30) / "model.safetensors").unlink()
    (manager.folder(60) / MANIFEST_NAME).unlink()
    messages = []
    with pytest.raises(CheckpointError) as info:
        manager.latest_valid(log=messages.append)
    message = str(info.value)
    assert "step_000030: file model.safetensors missing" in message
    assert "step_000060: checkpoint.json missing (incomplete write?)" in message
    assert "no earlier checkpoint to fall back to" in messages[-1]


def test_no_checkpoints(tmp_path):
    manager = CheckpointManager(tmp_path / "absent", keep_last=3)
    assert manager.list() == []
    assert manager.latest_valid() is None


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be None or an int >= 1, got 0"):
        CheckpointManager(tmp_path, keep_last=0)
    manager = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        manager.save(-1, _writer())
    with pytest.raises(ValueError, match=re.escape("write() created checkpoint.json")):
        manager.save(1, lambda folder: (folder / MANIFEST_NAME).write_text("{}"))
    assert _names(tmp_path) == []


def test_hash_streams_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "_CHUNK_BYTES", 7)
    data = bytes(range(256)) * 3
    (tmp_path / "blob").write_bytes(data)
    assert checkpoint_module._sha256(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


def test_checkpoint_of_training_state(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(1, lambda folder: save_state(optimizer.state_dict(), folder / "optimizer"))
    folder, step = manager.latest_valid()
    assert step == 1
    torch.optim.AdamW(model.parameters()).load_state_dict(load_state(folder / "optimizer"))
