"""A data folder may come from someone else: odd files, huge headers and hostile names.

Each case asserts what happens and what the message says (the file named, what is wrong).
Calls that used to block forever on a FIFO run in a thread with a timeout, so that a regression
fails instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import struct
import threading
import warnings
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfusion.data import (
    MAX_PIXELS_ENV,
    DataError,
    ImageFolderDataset,
    ImageReadError,
    MedicalImage,
    discover,
    inspect_dataset,
    max_pixels,
    read_image,
    read_info,
    write_image,
)
from medfusion.data.readers import format_of
from tests.data._builders import write_ct_series

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs and symlinks")

DEFAULT_LIMIT = 2**28


def finishes(call, *unblock: Path, timeout: float = 10.0):
    """Run ``call()`` in a thread; fail (after unblocking any reader of ``unblock``) if it hangs."""
    result: dict = {}

    def target():
        try:
            result["value"] = call()
        except BaseException as e:  # re-raised in the test's thread
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in unblock:  # a writer that closes at once gives a blocked reader EOF
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout)
        pytest.fail(f"call did not finish within {timeout} s (blocked opening a FIFO?)")
    if "error" in result:
        raise result["error"]
    return result["value"]


def problems_by_path(problems) -> dict[str, str]:
    return {p.path: p.message for p in problems}


# --------------------------------------------------------------------------------------------
# FIFOs, sockets, devices: never opened


@pytest.mark.parametrize("name", ["pipe.png", "IM0001", "pipe.dcm"])
def test_fifo_in_a_class_folder_is_a_problem_and_never_opened(make_folder, name):
    root = make_folder({"a": 2, "b": 2})
    fifo = root / "a" / name
    os.mkfifo(fifo)
    message = "is a FIFO (named pipe), not a regular file; it is not opened"

    found = finishes(lambda: discover(root), fifo)
    assert problems_by_path(found.problems) == {str(fifo): message}
    assert len(found.samples) == 4

    for read_pixels in (False, True):
        report = finishes(partial(inspect_dataset, root, read_pixels=read_pixels, progress=False), fifo)
        assert problems_by_path(report.problems) == {str(fifo): message}
        assert not report.usable and f"{fifo}: {message}" in report.format()
        report = finishes(
            partial(inspect_dataset, root, read_pixels=read_pixels, skip_bad=True, progress=False), fifo
        )
        assert report.usable and report.summary()["good_files"] == 4

    for validate in ("header", "full"):
        with pytest.warns(UserWarning, match=re.escape(f"{fifo}: {message}")):
            ds = finishes(partial(ImageFolderDataset, root, skip_bad=True, validate=validate), fifo)
        assert len(ds) == 4 and ds[0]["image"].shape == (1, 16, 16)
    with pytest.raises(DataError, match=re.escape(f"{fifo}: {message}")):
        finishes(lambda: ImageFolderDataset(root), fifo)


def test_readers_refuse_a_fifo(tmp_path):
    fifo = tmp_path / "listed.png"
    os.mkfifo(fifo)
    for read in (format_of, read_info, read_image):
        with pytest.raises(ImageReadError, match=re.escape(f"{fifo}: is a FIFO (named pipe)")):
            finishes(partial(read, fifo), fifo)


def test_labels_csv_listing_a_fifo_outside_the_folder(make_folder, tmp_path):
    root = make_folder(1)
    fifo = tmp_path / "elsewhere.png"
    os.mkfifo(fifo)
    csv = tmp_path / "labels.csv"
    csv.write_text(f"path,label\nimg000.png,a\n{fifo},b\n")
    found = finishes(lambda: discover(root, labels=csv), fifo)
    assert problems_by_path(found.problems) == {
        str(csv): f"line 3: {fifo} is a FIFO (named pipe), not a regular file; it is not opened"
    }
    assert [s.label for s in found.samples] == ["a"]


def test_socket_is_a_problem(make_folder):
    root = make_folder({"a": 2})
    path = root / "a" / "sock.png"
    if len(str(path)) > 100:
        pytest.skip("temporary path too long for an AF_UNIX socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        found = finishes(lambda: discover(root))
        assert problems_by_path(found.problems) == {
            str(path): "is a socket, not a regular file; it is not opened"
        }
        with pytest.raises(ImageReadError, match=re.escape(f"{path}: is a socket")):
            read_info(path)


def test_character_device_listed_in_a_csv(make_folder, tmp_path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    root = make_folder(1)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\nimg000.png,a\n/dev/zero,b\n")
    [problem] = discover(root, labels=csv).problems
    assert problem.path == str(csv)
    assert problem.message == "line 3: /dev/zero is a character device, not a regular file; it is not opened"
    with pytest.raises(ImageReadError, match=r"^/dev/zero: is a character device"):
        read_image("/dev/zero")


# --------------------------------------------------------------------------------------------
# Symbolic links


def test_dangling_symlink_is_named_by_the_link(make_folder):
    root = make_folder({"a": 2})
    link = root / "a" / "gone.png"
    link.symlink_to(root / "a" / "nowhere.png")
    message = f"is a symbolic link to {root / 'a' / 'nowhere.png'}, which does not exist"
    assert problems_by_path(discover(root).problems) == {str(link): message}
    with pytest.raises(ImageReadError, match=re.escape(f"{link}: {message}")):
        read_info(link)


def test_symlink_loop_is_a_per_file_problem(make_folder):
    root = make_folder({"a": 3})
    loop = root / "a" / "loop.png"
    loop.symlink_to("loop.png")
    message = "is a symbolic link loop (the link leads back to itself); remove or fix the link"
    assert problems_by_path(discover(root).problems) == {str(loop): message}
    report = inspect_dataset(root, skip_bad=True, progress=False)
    assert report.usable and report.summary()["good_files"] == 3
    with pytest.warns(UserWarning, match=re.escape(f"{loop}: {message}")):
        ds = ImageFolderDataset(root, skip_bad=True)
    assert len(ds) == 3
    with pytest.raises(ImageReadError, match=re.escape(f"{loop}: is a symbolic link loop")):
        read_image(loop)


def test_symlink_to_an_image_keeps_working(make_folder, tmp_path):
    root = make_folder({"a": 1, "b": 1})
    outside = tmp_path / "outside" / "x.png"
    outside.parent.mkdir()
    shutil.copy(root / "b" / "b000.png", outside)
    (root / "b" / "linked.png").symlink_to(outside)
    found = discover(root)
    assert not found.problems
    assert sorted(s.relpath for s in found.samples) == ["a/a000.png", "b/b000.png", "b/linked.png"]
    assert len(ImageFolderDataset(root, validate="full")) == 3


def test_symlink_to_a_folder_is_reported_not_followed(make_folder, tmp_path):
    root = make_folder({"a": 2})
    other = make_folder({"b": 1}, root=tmp_path / "other")
    (root / "b").symlink_to(other / "b")
    [problem] = discover(root).problems
    assert problem.path == str(root / "b")
    assert problem.message.startswith("is a symbolic link to a folder; links to folders are not followed")


# --------------------------------------------------------------------------------------------
# The pixel limit, checked from the header before decoding


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_header(path: Path, width: int, height: int, bit_depth: int, colour_type: int) -> Path:
    """A valid PNG signature and IHDR declaring ``width x height``, with a short IDAT: only a
    reader that trusts the header before decoding refuses it for its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(bytes(1 + width * 6 * 4))  # four zero rows of the widest pixel (16-bit RGB)
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return path


def test_16bit_rgb_png_bomb_is_refused_from_its_header(tmp_path):
    path = write_png_header(tmp_path / "data" / "a" / "bomb.png", 20000, 20000, 16, 2)
    assert path.stat().st_size < 5_000
    too_large = (
        "too large: 20000x20000 = 400,000,000 pixels (with 3 channel(s)), over the limit of "
        f"268,435,456 pixels per image (channels not counted); set {MAX_PIXELS_ENV} to a larger number"
    )
    for read in (read_info, read_image):
        with pytest.raises(ImageReadError, match=re.escape(f"{path}: {too_large}")):
            read(path)
    for read_pixels in (False, True):
        report = inspect_dataset(tmp_path / "data", read_pixels=read_pixels, progress=False)
        assert not report.usable
        assert problems_by_path(report.problems) == {str(path): too_large + " to read it"}


def test_8bit_png_bomb_is_refused_by_the_same_limit(tmp_path):
    path = write_png_header(tmp_path / "gray.png", 20000, 20000, 8, 0)
    expected = "20000x20000 = 400,000,000 pixels (with 1 channel(s))"
    with pytest.raises(ImageReadError, match=re.escape(f"{path}: too large: {expected}")):
        read_image(path)


def test_raising_the_limit_lets_a_large_header_through(tmp_path, monkeypatch):
    bomb = write_png_header(tmp_path / "bomb.png", 20000, 20000, 16, 2)
    big_gray = write_png_header(tmp_path / "big.png", 15000, 15000, 8, 0)  # over Pillow's own limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        info = read_info(big_gray)  # 225M pixels: under the default limit
        assert (info.shape, info.channels, info.dtype) == ((15000, 15000), 1, "uint8")
        monkeypatch.setenv(MAX_PIXELS_ENV, "400_000_000")
        assert max_pixels() == 400_000_000
        info = read_info(bomb)
        assert (info.shape, info.channels, info.dtype) == ((20000, 20000), 3, "uint16")
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own setting is left as it was


@pytest.mark.parametrize(
    ("name", "shape", "unit"),
    [
        ("gray.png", (128, 128), "pixels"),
        ("rgb16.png", (128, 128), "pixels"),  # through SimpleITK
        ("photo.jpg", (128, 128), "pixels"),
        ("photo.bmp", (128, 128), "pixels"),
        ("page.tif", (128, 128), "pixels"),
        ("ct.dcm", (128, 128), "pixels"),
        ("emri_small.dcm", (10, 64, 64), "voxels"),  # multi-frame DICOM, through SimpleITK
        ("series", (2, 128, 128), "voxels"),
        ("vol.nii.gz", (4, 5, 6), "voxels"),
        ("vol.mha", (4, 5, 6), "voxels"),
        ("vol.nrrd", (4, 5, 6), "voxels"),
    ],
)
def test_pixel_limit_applies_to_every_format(tmp_path, monkeypatch, real_gray_16bit, name, shape, unit):
    path = tmp_path / name
    gray8 = (real_gray_16bit >> 8).astype(np.uint8)
    if name == "gray.png":
        write_image(path, gray8)
    elif name == "rgb16.png":
        write_image(path, np.repeat(real_gray_16bit, 3, axis=0))
    elif name.endswith((".jpg", ".bmp")):
        Image.fromarray(gray8[0]).save(path)
    elif name == "page.tif":
        write_image(path, real_gray_16bit)
    elif name.endswith(".dcm"):
        from pydicom.data import get_testdata_file

        shutil.copy(get_testdata_file("CT_small.dcm" if name == "ct.dcm" else name), path)
    elif name == "series":
        write_ct_series(path, [0.0, 5.0])
    else:
        array = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
        write_image(path, MedicalImage.from_array(array))
    count = int(np.prod(shape))
    monkeypatch.setenv(MAX_PIXELS_ENV, str(count - 1))
    expected = f"{'x'.join(map(str, shape))} = {count:,} {unit}"
    for read in (read_info, read_image):
        with pytest.raises(ImageReadError, match=re.escape(f"{path}: too large: {expected}")):
            read(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, str(count))
    assert read_image(path).spatial_shape == shape


@pytest.mark.parametrize("value", ["many", "0", "-5", "1.5e8", "2**28"])
def test_bad_max_pixels_value_names_the_variable(make_folder, monkeypatch, value):
    root = make_folder({"a": 1})
    monkeypatch.setenv(MAX_PIXELS_ENV, value)
    message = re.escape(f"environment variable {MAX_PIXELS_ENV}={value!r} is not a valid pixel limit")
    for call in (max_pixels, lambda: read_info(root / "a" / "a000.png")):
        with pytest.raises(ValueError, match=message) as e:
            call()
        assert not isinstance(e.value, DataError)  # not blamed on a file
    with pytest.raises(ValueError, match=message):  # not turned into a per-file problem
        inspect_dataset(root, skip_bad=True, progress=False)


def test_max_pixels_default_and_blank(monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    assert max_pixels() == DEFAULT_LIMIT
    monkeypatch.setenv(MAX_PIXELS_ENV, " ")
    assert max_pixels() == DEFAULT_LIMIT
    monkeypatch.setenv(MAX_PIXELS_ENV, " 1000 ")
    assert max_pixels() == 1000


# --------------------------------------------------------------------------------------------
# Class names are data


@pytest.mark.parametrize(
    ("folder", "message"),
    [
        ("none", "class name 'none' is reserved"),
        ("ALL", "class name 'ALL' is reserved"),
        ("a:b", "class name 'a:b' holds ':'"),
        ("a\x01b", "class name 'a\\x01b' holds '\\x01'"),
        ("tumor ", "class name 'tumor ' starts or ends with white space"),
        ("x" * 200, "is 200 characters long; the limit is 128"),
    ],
)
def test_bad_class_folder_name_is_one_problem_and_its_files_are_left_out(make_folder, folder, message):
    root = make_folder({"good": 2, folder: 3})
    found = discover(root)
    [problem] = found.problems
    assert problem.path == str(root / folder)
    assert message in problem.message and problem.message.endswith("(its files are left out)")
    assert found.class_names == ("good",) and len(found.samples) == 2
    with pytest.warns(UserWarning, match="leaving out 1 bad file"):
        assert ImageFolderDataset(root, skip_bad=True).class_names == ("good",)


def test_hidden_class_folder_is_skipped(make_folder):
    root = make_folder({"good": 2, ".hidden": 2})
    found = discover(root)
    assert found.class_names == ("good",) and not found.problems


def test_class_folders_differing_only_in_case(make_folder):
    root = make_folder({"Tumor": 1, "tumor": 1, "normal": 1})
    found = discover(root)
    assert problems_by_path(found.problems) == {
        str(root / "Tumor"): "class name 'Tumor' differs from 'tumor' only in letter case (such names "
        "collide on some file systems); merge or rename them (its files are left out)",
        str(root / "tumor"): "class name 'tumor' differs from 'Tumor' only in letter case (such names "
        "collide on some file systems); merge or rename them (its files are left out)",
    }
    assert found.class_names == ("normal",)


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("../../tmp/x", "img000.png: class name '../../tmp/x' holds '/'"),
        ("a/../../x", "img000.png: class name 'a/../../x' holds '/'"),
        ("/abs", "img000.png: class name '/abs' holds '/'"),
        ("none", "img000.png: class name 'none' is reserved"),
        ("", "img000.png has an empty label"),
    ],
)
def test_bad_csv_label_is_a_problem_naming_the_csv_and_line(make_folder, tmp_path, label, message):
    root = make_folder(2)
    csv = tmp_path / "labels.csv"
    csv.write_text(f"path,label\nimg000.png,{label}\nimg001.png,ok\n")
    found = discover(root, labels=csv)
    by_path = problems_by_path(found.problems)
    assert by_path[str(csv)].startswith(f"line 2: {message}")
    assert found.class_names == ("ok",) and [s.relpath for s in found.samples] == ["img001.png"]


def test_dataset_checks_given_class_names(make_folder):
    with pytest.raises(ValueError, match=re.escape("class_names: class name 'none' is reserved")):
        ImageFolderDataset(make_folder({"a": 1}), class_names=["a", "none"])


# --------------------------------------------------------------------------------------------
# Empty class folders


def test_empty_class_folder_is_reported(make_folder):
    root = make_folder({"a": 2, "b": 1})
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("only a sidecar")
    message = "holds no images or volumes; it is not a class: remove it or fill it"
    found = discover(root)
    assert problems_by_path(found.problems) == {str(root / "empty"): message, str(root / "notes"): message}
    assert found.class_names == ("a", "b")
    report = inspect_dataset(root, read_pixels=False, progress=False)
    assert not report.usable and f"{root / 'empty'}: {message}" in report.format()
    assert inspect_dataset(root, read_pixels=False, skip_bad=True, progress=False).usable
    with pytest.warns(UserWarning, match="leaving out 2 bad file"):
        assert len(ImageFolderDataset(root, skip_bad=True)) == 3


def test_empty_subfolder_of_an_unlabelled_folder_is_not_a_class(make_folder):
    root = make_folder(2)
    (root / "empty").mkdir()
    found = discover(root)
    assert found.label_source == "none" and not found.problems
