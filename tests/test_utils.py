"""Tests for medfusion.utils: format suffixes and atomic files/folders."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from medfusion.utils import atomic_dir, atomic_path, atomic_write_text, full_suffix


def _entries(folder: Path) -> list[str]:
    """Every name in ``folder``, hidden ones included, sorted."""
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------
# full_suffix


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("scan.nii.gz", ".nii.gz"),
        ("a/b/sub-01_T1w.nii.gz", ".nii.gz"),
        ("SCAN.NII.GZ", ".nii.gz"),
        ("image.PNG", ".png"),
        ("photo.JpEg", ".jpeg"),
        ("volume.nii", ".nii"),
        ("archive.tar.gz", ".tar.gz"),
        ("notes.gz", ".gz"),
        ("README", ""),
        ("folder.v2/IM0001", ""),  # the suffix of a parent folder is not the file's
        (Path("x/y.mha"), ".mha"),
    ],
)
def test_full_suffix(path, expected):
    assert full_suffix(path) == expected


# --------------------------------------------------------------------------------------------
# atomic_path


def test_atomic_path_success_renames_temp_onto_path(tmp_path):
    target = tmp_path / "sub" / "out.nii.gz"  # the parent folder does not exist yet
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp != target
        assert full_suffix(tmp) == ".nii.gz"  # writers that choose their format by suffix still work
        assert not target.exists()  # nothing under the final name while writing
        tmp.write_bytes(b"complete")
    assert target.read_bytes() == b"complete"
    assert _entries(target.parent) == ["out.nii.gz"]


def test_atomic_path_replaces_existing_file_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    assert _entries(tmp_path) == ["out.txt"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_atomic_path_failure_leaves_no_file_and_no_temp(tmp_path, error):
    target = tmp_path / "out.png"
    with pytest.raises(type(error)), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise error
    assert not target.exists()
    assert _entries(tmp_path) == []


def test_atomic_path_failure_keeps_existing_file(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"previous"
    assert _entries(tmp_path) == ["out.png"]


def test_atomic_write_text(tmp_path):
    target = tmp_path / "a" / "b.txt"
    atomic_write_text(target, "héllo\n")
    assert target.read_text(encoding="utf-8") == "héllo\n"
    assert _entries(target.parent) == ["b.txt"]


# --------------------------------------------------------------------------------------------
# atomic_dir


def test_atomic_dir_success(tmp_path):
    target = tmp_path / "nested" / "run"
    with atomic_dir(target) as tmp:
        assert tmp.is_dir()
        assert tmp.parent == target.parent
        assert not target.exists()
        (tmp / "a.txt").write_text("a")
    assert target.is_dir()
    assert _entries(target) == ["a.txt"]
    assert _entries(target.parent) == ["run"]


def test_atomic_dir_existing_without_overwrite_raises(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="run"), atomic_dir(target):
        pytest.fail("the body must not run")
    assert _entries(target) == ["keep.txt"]
    assert _entries(tmp_path) == ["run"]


def test_atomic_dir_overwrite_replaces_only_after_success(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert _entries(target) == ["old.txt"]  # still the previous folder while writing
    assert _entries(target) == ["new.txt"]
    assert (target / "new.txt").read_text() == "new"
    assert _entries(tmp_path) == ["run"]  # no temporary or ".old" folder left


@pytest.mark.parametrize("overwrite", [False, True])
def test_atomic_dir_failure_leaves_no_temp(tmp_path, overwrite):
    target = tmp_path / "run"
    with pytest.raises(RuntimeError, match="crash"), atomic_dir(target, overwrite=overwrite) as tmp:
        (tmp / "partial.txt").write_text("partial")
        raise RuntimeError("crash")
    assert not target.exists()
    assert _entries(tmp_path) == []


def test_atomic_dir_failure_keeps_previous_folder(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="crash"), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "partial.txt").write_text("partial")
        raise RuntimeError("crash")
    assert _entries(target) == ["old.txt"]
    assert (target / "old.txt").read_text() == "old"
    assert _entries(tmp_path) == ["run"]


def test_atomic_outputs_get_the_umask_mode_not_a_private_one(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


# --------------------------------------------------------------------------------------------
# inside: names read from files never lead out of an output folder


@pytest.mark.parametrize("name", ["../x.png", "a/../../x.png", "/etc/x.png", "", ".", "a/..", "x\0y"])
def test_inside_refuses_names_leading_out(tmp_path, name):
    from medfusion.utils import inside

    with pytest.raises(ValueError, match=f"^{tmp_path}: refusing to write"):
        inside(tmp_path, name)


def test_inside_follows_links_out_of_the_folder(tmp_path):
    from medfusion.utils import inside

    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "a").symlink_to(tmp_path / "elsewhere")
    assert inside(tmp_path / "out", "b/c/000000.png") == tmp_path / "out" / "b/c/000000.png"
    with pytest.raises(ValueError, match="leads outside the folder"):
        inside(tmp_path / "out", "a/000000.png")


# --------------------------------------------------------------------------------------------
# one file mode policy; write failures name the final path


def test_atomic_dir_gives_every_file_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            secret = tmp / "sub" / "weights.safetensors"
            secret.write_bytes(b"w")
            os.chmod(secret, 0o600)  # what safetensors' writer does
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "model" / "sub").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "model" / "sub" / "weights.safetensors").stat().st_mode) == 0o640


def test_safetensors_failure_in_atomic_dir_names_the_folder(tmp_path):
    import errno

    from safetensors import SafetensorError

    target = tmp_path / "vae"
    with pytest.raises(OSError) as info, atomic_dir(target) as tmp:
        (tmp / "partial").write_bytes(b"x")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert str(info.value).startswith(f"{target}: cannot write: Error while serializing: I/O error: No space")
    assert _entries(tmp_path) == []
