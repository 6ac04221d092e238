"""Tests for medfusion.data.writers: write-then-read round trips, input checks, atomicity.

Conventions checked (see medfusion.data.image): arrays are (C, *spatial) in array order, spacing
and origin are in ITK physical (x, y, z) order, direction is the row-major direction matrix.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from medfusion.data import writers
from medfusion.data.image import MedicalImage, identity_direction
from medfusion.data.readers import read_image, read_info
from medfusion.data.writers import to_unsigned, write_image
from tests.data._builders import assert_info_agrees

VOLUME_SUFFIXES = [".nii", ".nii.gz", ".mha", ".nrrd"]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def random_array(rng, shape, dtype) -> np.ndarray:
    """Values spread over the whole range of an integer dtype (so truncation would show)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return (rng.normal(size=shape) * 100).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


def rotation(spatial_dims: int) -> np.ndarray:
    """A proper rotation that is neither the identity nor axis-aligned."""
    if spatial_dims == 2:
        t = 0.4
        return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    a, b = 0.3, 0.7
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def assert_unit_geometry(image: MedicalImage, spatial_dims: int) -> None:
    assert image.spatial_dims == spatial_dims
    assert image.spacing == (1.0,) * spatial_dims
    assert image.origin == (0.0,) * spatial_dims
    assert image.direction == identity_direction(spatial_dims)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_round_trip(tmp_path, rng, dtype, channels):
    array = random_array(rng, (channels, 9, 13), dtype)  # H != W catches swapped axes
    path = write_image(tmp_path / "img.png", array)
    assert path == tmp_path / "img.png"

    image = read_image(path)
    assert image.array.dtype == np.dtype(dtype)
    assert image.array.shape == (channels, 9, 13)
    np.testing.assert_array_equal(image.array, array)
    assert_unit_geometry(image, 2)
    info = read_info(path)
    assert info.format == "png"
    assert_info_agrees(info, image, atol=1e-9)


@pytest.mark.parametrize("channels", [3, 4])
def test_png_16bit_colour_is_not_truncated(tmp_path, channels):
    # Pillow would open 16-bit RGB(A) as 8-bit; the reader must keep all 16 bits.
    array = np.zeros((channels, 4, 5), np.uint16)
    array[:, 0, 0] = 65535
    array[:, 1, 2] = 257  # differs from 256 only in the low byte
    array[:, 3, 4] = 1
    path = write_image(tmp_path / "deep.png", array)
    image = read_image(path)
    assert image.array.dtype == np.uint16
    np.testing.assert_array_equal(image.array, array)
    assert read_info(path).dtype == "uint16"


@pytest.mark.parametrize(
    ("dtype", "channels", "height", "width"),
    [
        ("uint8", 1, 9, 13),
        ("uint16", 1, 9, 13),
        ("float32", 1, 9, 13),
        ("uint8", 3, 9, 13),
        ("uint16", 3, 9, 13),
        ("uint8", 4, 9, 13),
        ("uint16", 4, 9, 13),
        ("uint8", 5, 9, 13),  # never cut to 3 channels, never split into pages
        ("uint16", 5, 9, 13),
        ("float32", 2, 3, 8),  # 3 rows: must not be taken for RGB planes
    ],
)
def test_tiff_round_trip(tmp_path, rng, dtype, channels, height, width):
    array = random_array(rng, (channels, height, width), dtype)
    path = write_image(tmp_path / "img.tif", array)

    image = read_image(path)
    assert image.array.dtype == np.dtype(dtype)
    assert image.array.shape == (channels, height, width)
    np.testing.assert_array_equal(image.array, array)
    assert_unit_geometry(image, 2)
    info = read_info(path)
    assert info.format == "tiff"
    assert_info_agrees(info, image, atol=1e-9)


def test_tiff_suffix_tiff(tmp_path, rng):
    array = random_array(rng, (3, 8, 8), "uint8")
    np.testing.assert_array_equal(read_image(write_image(tmp_path / "x.TIFF", array)).array, array)


@pytest.mark.parametrize("suffix", VOLUME_SUFFIXES)
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32"])
def test_volume_round_trip(tmp_path, rng, suffix, spatial_dims, channels, dtype):
    spatial = (5, 6, 7) if spatial_dims == 3 else (6, 7)
    spacing = (0.5, 0.75, 2.0)[:spatial_dims]  # x, y, z
    origin = (-10.5, 3.25, 7.0)[:spatial_dims]
    direction = tuple(rotation(spatial_dims).ravel().tolist())
    array = random_array(rng, (channels, *spatial), dtype)
    original = MedicalImage.from_array(array, spacing=spacing, origin=origin, direction=direction)

    path = write_image(tmp_path / f"vol{suffix}", original)
    image = read_image(path)

    assert image.spatial_dims == spatial_dims
    assert image.array.dtype == np.dtype(dtype)
    assert image.array.shape == (channels, *spatial)
    np.testing.assert_array_equal(image.array, array)
    # NIfTI keeps the direction as a float32 quaternion: equal up to float32 precision
    np.testing.assert_allclose(image.spacing, spacing, rtol=0, atol=1e-6)
    np.testing.assert_allclose(image.origin, origin, rtol=0, atol=1e-6)
    np.testing.assert_allclose(image.direction, direction, rtol=0, atol=1e-6)
    assert_info_agrees(read_info(path), image, atol=1e-9)


@pytest.mark.parametrize("suffix", VOLUME_SUFFIXES)
def test_single_slice_volume_stays_3d(tmp_path, suffix):
    array = np.arange(6 * 7, dtype=np.int16).reshape(1, 1, 6, 7)
    image = read_image(write_image(tmp_path / f"slab{suffix}", array))
    assert image.spatial_dims == 3
    np.testing.assert_array_equal(image.array, array)


def test_axes_are_not_swapped(tmp_path):
    # A voxel at array index (d, h, w) lands at physical x = w * sx, y = h * sy, z = d * sz.
    import SimpleITK as sitk

    array = np.zeros((1, 3, 4, 5), np.int16)
    array[0, 1, 2, 3] = 7
    path = write_image(tmp_path / "v.mha", MedicalImage.from_array(array, spacing=(1.0, 2.0, 3.0)))
    itk = sitk.ReadImage(str(path))
    assert itk.GetSize() == (5, 4, 3)
    assert itk.GetSpacing() == (1.0, 2.0, 3.0)
    assert itk.GetPixel(3, 2, 1) == 7


def test_write_torch_tensor(tmp_path):
    torch = pytest.importorskip("torch")
    tensor = torch.linspace(-1, 1, 2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    image = MedicalImage.from_array(tensor, spacing=(0.5, 1.0, 1.5))
    path = write_image(tmp_path / "t.nii.gz", image)
    back = read_image(path)
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, tensor.numpy())
    assert back.spacing == (0.5, 1.0, 1.5)


# --------------------------------------------------------------------------------------------
# to_unsigned


def test_to_unsigned_8bit():
    out = to_unsigned(np.array([-1.0, 1.0, 0.0, -5.0, 3.0]), 8)
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 255, 128, 0, 255]  # clipped outside [-1, 1]


def test_to_unsigned_16bit_keeps_shape():
    array = np.array([[[-1.0, 1.0], [-2.0, 2.0]]], dtype=np.float32)
    out = to_unsigned(array, 16)
    assert out.dtype == np.uint16
    assert out.shape == (1, 2, 2)
    assert out.ravel().tolist() == [0, 65535, 0, 65535]


def test_to_unsigned_is_monotonic_and_fills_the_range():
    out = to_unsigned(np.linspace(-1, 1, 1001), 8)
    assert np.all(np.diff(out.astype(int)) >= 0)
    assert set(np.unique(out).tolist()) == set(range(256))


def test_to_unsigned_rejects_other_bit_depths():
    with pytest.raises(ValueError, match="bit_depth must be 8 or 16; got 12"):
        to_unsigned(np.zeros(3), 12)


def test_to_unsigned_output_writes_as_png(tmp_path):
    array = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 8, 8)
    path = write_image(tmp_path / "x.png", to_unsigned(array, 16))
    back = read_image(path).array
    assert back.dtype == np.uint16
    assert back.min() == 0 and back.max() == 65535


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("dtype", ["float32", "float64", "int16"])
def test_png_rejects_non_unsigned_values(tmp_path, dtype):
    path = tmp_path / "x.png"
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*uint8 or uint16.*to_unsigned"):
        write_image(path, np.zeros((1, 4, 4), dtype))
    assert _entries(tmp_path) == []


@pytest.mark.parametrize("channels", [2, 5])
def test_png_rejects_channel_counts(tmp_path, channels):
    path = tmp_path / "x.png"
    with pytest.raises(ValueError, match=re.escape(f"{path}: PNG holds 1, 3 or 4 channels; got {channels}")):
        write_image(path, np.zeros((channels, 4, 4), np.uint8))
    assert _entries(tmp_path) == []


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_2d_formats_reject_volumes(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*needs shape \(C, H, W\)"):
        write_image(path, np.zeros((1, 2, 4, 4), np.uint8))
    assert _entries(tmp_path) == []


@pytest.mark.parametrize("name", ["x.xyz", "x.jpg", "noext"])
def test_unknown_suffix_rejected(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": cannot write suffix"):
        write_image(path, np.zeros((1, 4, 4), np.uint8))
    assert _entries(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Atomicity: a failing writer leaves nothing behind and no half-written file


def _broken_writer(tmp: Path, image, array) -> None:
    tmp.write_bytes(b"partial data")
    raise RuntimeError("disk full")


@pytest.mark.parametrize(
    ("name", "writer"),
    [
        ("x.nii.gz", "_write_sitk"),
        ("x.mha", "_write_sitk"),
        ("x.png", "_write_png"),
        ("x.tif", "_write_tiff"),
    ],
)
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, name, writer):
    monkeypatch.setattr(writers, writer, _broken_writer)
    path = tmp_path / name
    with pytest.raises(OSError, match=f"{re.escape(str(path))}: cannot write: disk full"):
        write_image(path, np.zeros((1, 4, 4), np.uint8))
    assert not path.exists()
    assert _entries(tmp_path) == []  # no temporary file either


def test_failed_write_keeps_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "x.nii.gz"
    original = np.arange(16, dtype=np.int16).reshape(1, 4, 4)
    write_image(path, original)
    before = path.read_bytes()

    monkeypatch.setattr(writers, "_write_sitk", _broken_writer)
    with pytest.raises(OSError, match="disk full"):
        write_image(path, np.ones((1, 4, 4), np.int16))

    assert path.read_bytes() == before
    assert _entries(tmp_path) == ["x.nii.gz"]
    np.testing.assert_array_equal(read_image(path).array, original)


def _silent_writer(content: bytes):
    """A writer that loses data without saying so (SimpleITK's on a full disk)."""

    def write(tmp: Path, image, array) -> None:
        tmp.write_bytes(content)

    return write


@pytest.mark.parametrize("name", ["x.png", "x.tif", "x.nii.gz", "x.mha"])
@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n", b"\x1f\x8b\x08\x00partial"])
def test_silently_lost_write_is_caught_before_the_rename(tmp_path, monkeypatch, name, content):
    writer = {".png": "_write_png", ".tif": "_write_tiff"}.get(Path(name).suffix, "_write_sitk")
    monkeypatch.setattr(writers, writer, _silent_writer(content))
    path = tmp_path / name
    with pytest.raises(OSError, match=f"^{re.escape(str(path))}: cannot write: the file "):
        write_image(path, np.zeros((1, 4, 4), np.uint8))
    assert _entries(tmp_path) == []  # nothing under the final name, no temporary file


def test_write_that_reads_back_other_values_is_refused(tmp_path, monkeypatch):
    real = writers._write_png

    def wrong(tmp: Path, image, array) -> None:  # a whole, valid PNG of other values
        real(tmp, image, array + 1)

    monkeypatch.setattr(writers, "_write_png", wrong)
    path = tmp_path / "x.png"
    with pytest.raises(OSError, match="reads back with other values"):
        write_image(path, np.zeros((1, 4, 4), np.uint8))
    assert _entries(tmp_path) == []


def test_os_errors_of_a_writer_name_the_final_path(tmp_path, monkeypatch):
    import errno

    def full(tmp: Path, image, array) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")  # no file name, as Pillow raises it

    monkeypatch.setattr(writers, "_write_tiff", full)
    path = tmp_path / "sub" / "x.tif"
    with pytest.raises(OSError) as info:
        write_image(path, np.zeros((1, 4, 4), np.uint8))
    assert info.value.errno == errno.ENOSPC
    assert str(info.value).startswith(f"{path}: cannot write: No space left on device")
    assert _entries(path.parent) == []


@pytest.mark.parametrize("name", ["x.png", "x.nii.gz", "x.tif", "x.mha"])
def test_written_file_problem_accepts_whole_files(tmp_path, name):
    array = np.arange(2 * 4 * 4, dtype=np.uint16).reshape(1, 2, 4, 4)
    array = array[:, 0] if name.endswith((".png", ".tif")) else array
    write_image(tmp_path / name, array)
    assert writers.written_file_problem(tmp_path / name, array.shape, "uint16") is None


def test_written_file_problem_finds_damage(tmp_path):
    array = np.random.default_rng(0).integers(0, 4000, (1, 8, 16, 16)).astype(np.int16)
    path = tmp_path / "x.nii.gz"
    write_image(path, array)
    whole = path.read_bytes()
    assert writers.written_file_problem(path, array.shape, "int16") is None
    assert "expected int16 [1, 8, 16, 8]" in writers.written_file_problem(path, (1, 8, 16, 8), "int16")
    assert "expected uint8" in writers.written_file_problem(path, array.shape, "uint8")
    path.write_bytes(whole[: len(whole) // 2])  # the header survives, the data is cut
    assert "cut short" in writers.written_file_problem(path, array.shape, "int16")
    path.write_bytes(b"")
    assert writers.written_file_problem(path, array.shape, "int16") == "empty"
    path.unlink()
    assert "missing" in writers.written_file_problem(path, array.shape, "int16")
    png = tmp_path / "y.png"
    write_image(png, np.zeros((1, 4, 4), np.uint8))
    png.write_bytes(png.read_bytes()[:20])
    assert writers.written_file_problem(png, (1, 4, 4), "uint8") is not None


def test_write_overwrites_existing_file(tmp_path):
    path = tmp_path / "x.png"
    write_image(path, np.zeros((1, 4, 4), np.uint8))
    write_image(path, np.full((3, 4, 4), 9, np.uint8))
    image = read_image(path)
    assert image.channels == 3
    assert int(image.array.min()) == 9
    assert _entries(tmp_path) == ["x.png"]


# storing generated images like the training data: intensity_mapping


def _normalized(array: np.ndarray, **kwargs) -> np.ndarray:
    """What the training pipeline feeds the model: NormalizeIntensity's output as a numpy array."""
    from medfusion.data.transforms import NormalizeIntensity

    image = MedicalImage.from_array(array)
    return NormalizeIntensity(**kwargs)(image, np.random.default_rng(0)).array.numpy()


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_intensity_mapping_inverts_dtype_normalisation_exactly(rng, dtype):
    """'dtype' (and 'auto' for 8-bit) normalised training values come back bit for bit."""
    original = random_array(rng, (1, 6, 5), np.dtype(dtype))
    mode = "auto" if dtype == "uint8" else "dtype"
    mapping = writers.intensity_mapping(".png", dtype, {"normalization": mode})
    assert mapping.physical and mapping.dtype == dtype
    back = mapping(_normalized(original, mode=mode))
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, original)


def test_intensity_mapping_returns_ct_volumes_in_hounsfield_units(rng):
    hu = rng.integers(-1000, 1001, size=(1, 4, 5, 6)).astype(np.int16)
    normalization = {"normalization": "window", "window": [-1000, 1000]}
    mapping = writers.intensity_mapping(".nii.gz", "int16", normalization)
    assert mapping.physical and mapping.dtype == "int16"
    back = mapping(_normalized(hu, mode="window", window=(-1000.0, 1000.0)))
    np.testing.assert_array_equal(back, hu)
    assert "training data's units" in mapping.describe()


def test_intensity_mapping_window_outside_the_integer_range_gives_floats():
    mapping = writers.intensity_mapping(".nii.gz", "uint8", {"normalization": "window", "window": [-50, 300]})
    assert mapping.dtype == "float32"
    np.testing.assert_allclose(mapping(np.array([-1.0, 0.0, 1.0])), [-50.0, 125.0, 300.0])


@pytest.mark.parametrize(
    ("suffix", "source", "normalization", "dtype", "physical"),
    [
        (".png", "uint16", {"normalization": "percentile"}, "uint16", False),
        (".png", "int16", {"normalization": "window"}, "uint16", False),  # PNG holds no negative HU
        (".tif", "int16", {"normalization": "window"}, "int16", True),  # TIFF does: 2D CT in HU
        (".png", "uint16", {"normalization": "dataset", "bounds": [[999, 1385]]}, "uint16", True),
        (".nii.gz", "int16", {"normalization": "dataset", "bounds": [[-25, 592]]}, "int16", True),
        (".nii.gz", "uint8", {"normalization": "dataset", "bounds": [[-0.5, 300.25]]}, "float32", True),
        (".png", "uint8", {"normalization": "percentile"}, "uint8", False),
        (".tif", "float32", {"normalization": "minmax"}, "uint16", False),
        (".nii.gz", "int16", {"normalization": "percentile"}, "uint16", False),  # MR: per-image scale
        (".nii.gz", "int16", {"normalization": "dtype"}, "int16", True),
        (".nii.gz", "uint8", {"normalization": "auto"}, "uint8", True),
    ],
)
def test_intensity_mapping_choices(suffix, source, normalization, dtype, physical):
    mapping = writers.intensity_mapping(suffix, source, normalization)
    assert (mapping.dtype, mapping.physical) == (dtype, physical)
    values = mapping(np.array([-2.0, -1.0, 1.0, 3.0]))  # outside [-1, 1] is clipped
    assert values.dtype == np.dtype(dtype)
    assert values[0] == values[1] == mapping.low[0] and values[2] == values[3] == mapping.high[0]


def test_intensity_mapping_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"cannot write suffix '\.jpg'"):
        writers.intensity_mapping(".jpg", "uint8")
    with pytest.raises(ValueError, match="source_dtype 'pixels' is not a numpy dtype"):
        writers.intensity_mapping(".png", "pixels")
