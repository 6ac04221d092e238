"""Tests for medfusion.data.readers: JPEG/BMP/palette PNG, 4D NIfTI, real DICOM files and series,
and the errors raised for bad files.

Conventions checked (see medfusion.data.image): arrays are (C, *spatial) in array order, spacing
and origin are in ITK physical (x, y, z) order, direction is the row-major direction matrix.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medfusion.data.errors import ImageReadError
from medfusion.data.image import identity_direction
from medfusion.data.readers import read_image, read_info
from medfusion.data.writers import write_image
from tests.data._builders import assert_info_agrees


def dicom_file(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not in the installed pydicom test data")
    return str(path)


def raw_pixels(path: str) -> np.ndarray:
    """pydicom's stored values, before the modality LUT and without MONOCHROME1 inversion."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path).pixel_array


def error_at(path, what: str) -> str:
    """A ``match`` pattern: the message starts with the path and then says ``what`` (a regex)."""
    return "^" + re.escape(str(path)) + ": .*" + what


# --------------------------------------------------------------------------------------------
# JPEG, BMP, palette PNG (written with Pillow)


def _gradient(height: int = 16, width: int = 24) -> np.ndarray:
    """Smooth content that JPEG keeps almost exactly: (3, H, W) uint8."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 10, y * 15, 255 - x * 10]).astype(np.uint8)


@pytest.mark.parametrize("name", ["photo.jpg", "photo.JPEG"])
def test_jpeg_rgb(tmp_path, name):
    expected = _gradient()
    path = tmp_path / name
    # 4:4:4 (no chroma subsampling) so that the decoded values stay close to the written ones
    Image.fromarray(np.moveaxis(expected, 0, -1), mode="RGB").save(
        path, format="JPEG", quality=95, subsampling=0
    )

    image = read_image(path)
    assert image.array.shape == (3, 16, 24)
    assert image.array.dtype == np.uint8
    assert np.abs(image.array.astype(int) - expected).max() <= 8
    assert image.spacing == (1.0, 1.0)
    info = read_info(path)
    assert info.format == "jpeg"
    assert_info_agrees(info, image)


def test_jpeg_grayscale_stays_one_channel(tmp_path):
    expected = _gradient()[0]
    path = tmp_path / "gray.jpeg"
    Image.fromarray(expected, mode="L").save(path, quality=95)

    image = read_image(path)
    assert image.array.shape == (1, 16, 24)
    assert image.array.dtype == np.uint8
    assert np.abs(image.array[0].astype(int) - expected).max() <= 8
    assert_info_agrees(read_info(path), image)


def test_bmp_rgb(tmp_path):
    expected = _gradient(8, 12)
    path = tmp_path / "x.bmp"
    Image.fromarray(np.moveaxis(expected, 0, -1), mode="RGB").save(path)
    image = read_image(path)
    np.testing.assert_array_equal(image.array, expected)
    assert_info_agrees(read_info(path), image)


def test_palette_png_is_expanded_to_rgb(tmp_path):
    indices = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255]  # red, green, blue
    im = Image.fromarray(indices, mode="P")
    im.putpalette(palette + [0] * (768 - len(palette)))
    path = tmp_path / "pal.png"
    im.save(path)

    image = read_image(path)
    assert image.array.shape == (3, 2, 3)
    colours = np.array(palette, np.uint8).reshape(3, 3)
    np.testing.assert_array_equal(np.moveaxis(image.array, 0, -1), colours[indices])
    assert_info_agrees(read_info(path), image)


# --------------------------------------------------------------------------------------------
# NIfTI written by nibabel


def test_4d_scalar_nifti_is_read_as_channels(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((5, 6, 7, 3)).astype(np.float32)  # nibabel order: (x, y, z, t)
    affine = np.diag([0.5, 0.75, 2.0, 1.0])
    affine[:3, 3] = [1.0, 2.0, 3.0]
    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)

    image = read_image(path)
    # The fourth axis becomes the channel axis; the spatial axes are reversed to array order (z, y, x).
    assert image.spatial_dims == 3
    assert image.array.shape == (3, 7, 6, 5)
    assert image.array.dtype == np.float32
    for c in range(3):
        np.testing.assert_array_equal(image.array[c], data[..., c].transpose(2, 1, 0))
    np.testing.assert_allclose(image.spacing, (0.5, 0.75, 2.0))
    # ITK geometry is LPS: NIfTI's RAS x and y change sign.
    np.testing.assert_allclose(image.origin, (-1.0, -2.0, 3.0))
    np.testing.assert_allclose(image.direction, (-1, 0, 0, 0, -1, 0, 0, 0, 1))

    info = read_info(path)
    assert (info.shape, info.channels, info.spatial_dims) == ((7, 6, 5), 3, 3)
    assert_info_agrees(info, image)


def test_nifti_axis_order(tmp_path):
    data = np.zeros((4, 5, 6), np.int16)  # (x, y, z)
    data[1, 2, 3] = 42
    path = tmp_path / "one.nii"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 2.0, 3.0, 1.0])), path)
    image = read_image(path)
    assert image.array.shape == (1, 6, 5, 4)
    assert image.array[0, 3, 2, 1] == 42
    assert image.array.sum() == 42
    assert image.spacing == (1.0, 2.0, 3.0)


def test_nii_gz_beside_nii_of_the_same_name(tmp_path):
    # Both x.nii and x.nii.gz exist: reading x.nii.gz must not take any pixels from x.nii.
    nib.save(nib.Nifti1Image(np.full((2, 3, 4), 7, np.int16), np.eye(4)), tmp_path / "x.nii")
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "x.nii.gz")

    image = read_image(tmp_path / "x.nii.gz")
    np.testing.assert_array_equal(image.array[0], data.transpose(2, 1, 0))
    assert read_image(tmp_path / "x.nii").array.max() == 7


# --------------------------------------------------------------------------------------------
# Real DICOM files from pydicom-data


@pytest.fixture(scope="module")
def rg1():
    """The large MONOCHROME1 chest CR, read once: (path, read_image result, raw pixels)."""
    path = dicom_file("RG1_UNCI.dcm")
    return path, read_image(path), raw_pixels(path)


def test_monochrome1_is_inverted(rg1):
    path, image, raw = rg1
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert ds.BitsStored == 15
    assert "RescaleSlope" not in ds
    assert image.array.shape == (1, 1955, 1841)
    assert image.array.dtype == np.uint16
    np.testing.assert_array_equal(image.array[0], (2**15 - 1) - raw.astype(np.int64))
    assert image.modality == "CR"
    assert_info_agrees(read_info(path), image)


def test_ct_rescale_is_applied():
    path = dicom_file("CT_small.dcm")
    image = read_image(path)
    raw = raw_pixels(path)
    assert image.array.shape == (1, 128, 128)
    assert np.issubdtype(image.array.dtype, np.signedinteger)
    np.testing.assert_array_equal(image.array[0], raw.astype(np.int64) - 1024)
    assert image.spacing == pytest.approx((0.661468, 0.661468))
    assert image.modality == "CT"
    assert_info_agrees(read_info(path), image)


def test_jpeg_ls_fallback_matches_uncompressed(monkeypatch):
    import SimpleITK as sitk

    plain = read_image(dicom_file("MR_small.dcm"))
    compressed_path = dicom_file("MR_small_jpeg_ls_lossless.dcm")

    calls = []
    real_read = sitk.ReadImage

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real_read(*args, **kwargs)

    monkeypatch.setattr(sitk, "ReadImage", spy)
    compressed = read_image(compressed_path)

    assert compressed.array.dtype == plain.array.dtype
    assert compressed.array.shape == plain.array.shape == (1, 64, 64)
    np.testing.assert_array_equal(compressed.array, plain.array)
    assert compressed.spacing == plain.spacing == pytest.approx((0.3125, 0.3125))
    assert_info_agrees(read_info(compressed_path), compressed)

    try:
        raw_pixels(compressed_path)
    except Exception:
        assert calls == [compressed_path]  # no pydicom decoder: decoded through SimpleITK
    else:
        pytest.skip("a pydicom JPEG-LS decoder is installed; the SimpleITK fallback was not exercised")


def test_rgb_dicom():
    path = dicom_file("SC_rgb.dcm")
    image = read_image(path)
    assert image.array.shape == (3, 100, 100)
    assert image.array.dtype == np.uint8
    np.testing.assert_array_equal(image.array, np.moveaxis(raw_pixels(path), -1, 0))
    assert_info_agrees(read_info(path), image)


def test_multiframe_dicom_is_a_volume():
    path = dicom_file("emri_small.dcm")
    image = read_image(path)
    assert image.spatial_dims == 3
    assert image.array.shape == (1, 10, 64, 64)
    np.testing.assert_array_equal(image.array[0], raw_pixels(path))
    assert image.modality == "MR"
    assert_info_agrees(read_info(path), image)


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "SC_rgb.dcm",
        "emri_small.dcm",
        "liver.dcm",  # multi-frame: in-plane spacing only in the functional groups
        "rtdose.dcm",  # multi-frame: slice spacing from GridFrameOffsetVector
        "eCT_Supplemental.dcm",  # multi-frame CT with a rescale
    ],
)
def test_dicom_info_agrees_with_image(name):
    path = dicom_file(name)
    info = read_info(path)
    assert info.format == "dicom"
    assert_info_agrees(info, read_image(path))


# --------------------------------------------------------------------------------------------
# A DICOM series folder, written from CT_small.dcm


SLICE_Z = [0.0, 5.0, 10.0, 15.0]


def _write_series(folder: Path, z_positions=SLICE_Z, series_uids=None) -> list[np.ndarray]:
    """Copies of CT_small.dcm as one slice each; returns the stored pixels in z order."""
    folder.mkdir(parents=True, exist_ok=True)
    source = dicom_file("CT_small.dcm")
    slices = []
    for i, z in enumerate(z_positions):
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [10.0, 20.0, z]
        ds.SliceThickness = 1.25  # differs from the slice distance: spacing must come from positions
        if series_uids is not None:
            ds.SeriesInstanceUID = series_uids[i]
        pixels = ds.pixel_array.astype(np.int16) + np.int16(i * 10)  # each slice distinct
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"IM{len(z_positions) - i:04d}.dcm")  # file names in reverse z order
        slices.append(pixels)
    return slices


def test_dicom_series_folder(tmp_path):
    folder = tmp_path / "series"
    slices = _write_series(folder)

    image = read_image(folder)
    assert image.array.shape == (1, 4, 128, 128)
    assert image.spatial_dims == 3
    np.testing.assert_array_equal(image.array[0], np.stack(slices).astype(np.int64) - 1024)
    assert image.spacing == pytest.approx((0.661468, 0.661468, 5.0))
    assert image.origin == pytest.approx((10.0, 20.0, 0.0))
    assert image.direction == pytest.approx(identity_direction(3))
    assert image.modality == "CT"

    info = read_info(folder)
    assert info.format == "dicom-series"
    assert_info_agrees(info, image)


def test_dicom_folder_with_two_series(tmp_path):
    folder = tmp_path / "mixed"
    uids = [generate_uid(), generate_uid()]
    _write_series(folder, series_uids=[uids[0], uids[0], uids[1], uids[1]])
    pattern = error_at(folder, "folder holds 2 DICOM series")
    with pytest.raises(ImageReadError, match=pattern):
        read_image(folder)
    with pytest.raises(ImageReadError, match=pattern):
        read_info(folder)


def test_folder_without_dicom(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("nothing here")
    with pytest.raises(ImageReadError, match=error_at(folder, "holds no DICOM series")):
        read_image(folder)


# --------------------------------------------------------------------------------------------
# Bad files: every error is an ImageReadError whose message names the file and the problem


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(("dtype", "channels"), [("uint8", 3), ("uint16", 1), ("uint16", 3)])
def test_truncated_png(tmp_path, dtype, channels):
    rng = np.random.default_rng(0)
    array = rng.integers(0, np.iinfo(dtype).max, (channels, 32, 32), endpoint=True).astype(dtype)
    path = write_image(tmp_path / "cut.png", array)
    _truncate(path)

    # The header is intact, so read_info may still succeed (and then must be right) ...
    try:
        info = read_info(path)
    except ImageReadError as e:
        assert str(path) in str(e)
    else:
        assert (info.shape, info.channels, info.dtype) == ((32, 32), channels, dtype)
    # ... but decoding must fail.
    with pytest.raises(ImageReadError, match=error_at(path, "corrupt or truncated")) as excinfo:
        read_image(path)
    assert excinfo.value.path == str(path)


def test_truncated_dicom():
    path = dicom_file("MR_truncated.dcm")
    with pytest.raises(ImageReadError, match=error_at(path, "truncated")):
        read_image(path)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "scan.png"
    path.write_text("this is not an image\n")
    for read in (read_info, read_image):
        with pytest.raises(ImageReadError, match=error_at(path, "not a readable image")):
            read(path)


@pytest.mark.parametrize("name", ["notes.pdf", "README"])
def test_unsupported_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_text("text")
    for read in (read_info, read_image):
        with pytest.raises(ImageReadError, match=error_at(path, "not a supported image")):
            read(path)


@pytest.mark.parametrize(
    "name", ["gone.png", "gone.jpg", "gone.tif", "gone.nii.gz", "gone.dcm", "gone.mha", "gone.nrrd", "gone"]
)
def test_missing_file(tmp_path, name):
    path = tmp_path / name
    for read in (read_info, read_image):
        with pytest.raises(ImageReadError, match=error_at(path, "(?i:no such file)")):
            read(path)


def test_metaimage_with_detached_data(tmp_path):
    """A .mhd header with its .raw data file: read with geometry; the .raw is not a sample."""
    import SimpleITK as sitk

    from medfusion.data import discover

    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    itk = sitk.GetImageFromArray(array)
    itk.SetSpacing((0.5, 0.75, 2.0))
    itk.SetOrigin((-3.0, 4.0, 5.0))
    sitk.WriteImage(itk, str(tmp_path / "vol.mhd"))
    assert (tmp_path / "vol.raw").exists()
    image = read_image(tmp_path / "vol.mhd")
    np.testing.assert_array_equal(image.array, array[None])
    assert image.spacing == (0.5, 0.75, 2.0) and image.origin == (-3.0, 4.0, 5.0)
    info = read_info(tmp_path / "vol.mhd")
    assert info.format == "metaimage" and info.shape == (4, 5, 6) and info.dtype == "int16"
    found = discover(tmp_path)
    assert [s.relpath for s in found.samples] == ["vol.mhd"] and found.ignored == ("vol.raw",)


def test_empty_nifti_file(tmp_path):
    path = tmp_path / "x.nii.gz"
    path.touch()
    for read in (read_info, read_image):
        with pytest.raises(
            ImageReadError, match=error_at(path, "(?i:(not a readable|cannot read( as)?) nifti)")
        ):
            read(path)


def _nan_volume() -> np.ndarray:
    data = np.ones((4, 5, 6), np.float32)  # nibabel order (x, y, z)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    return data


@pytest.mark.parametrize("name", ["nan.nii.gz", "nan.nii"])
def test_nifti_with_nan(tmp_path, name):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(_nan_volume(), np.eye(4)), path)

    with pytest.raises(ImageReadError, match=error_at(path, "contains 2 NaN/Inf values")):
        read_image(path)

    image = read_image(path, check_finite=False)
    assert image.array.shape == (1, 6, 5, 4)
    assert np.isnan(image.array[0, 3, 2, 1])
    assert np.isposinf(image.array[0, 0, 0, 0])
    assert np.count_nonzero(~np.isfinite(image.array)) == 2
    assert np.all(image.array[np.isfinite(image.array)] == 1)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
def test_written_volume_with_nan(tmp_path, suffix):
    array = np.zeros((2, 3, 4, 5), np.float32)
    array[1, 2, 3, 4] = np.nan
    array[0, 0, 1, 2] = -np.inf
    path = write_image(tmp_path / f"v{suffix}", array)
    with pytest.raises(ImageReadError, match=error_at(path, "NaN")):
        read_image(path)
    back = read_image(path, check_finite=False).array
    np.testing.assert_array_equal(back, array)  # NaN == NaN for assert_array_equal


def test_float_tiff_with_nan(tmp_path):
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, np.array([[0.0, np.nan], [1.0, 2.0]], np.float32))
    with pytest.raises(ImageReadError, match=error_at(path, "contains 1 NaN/Inf values")):
        read_image(path)
    assert np.isnan(read_image(path, check_finite=False).array[0, 0, 1])


def test_zero_size_tiff(tmp_path):
    path = tmp_path / "empty.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile warns: "writing zero-size array to nonconformant TIFF"
        tifffile.imwrite(path, np.zeros((0, 8), np.uint8))
    for read in (read_info, read_image):
        with pytest.raises(ImageReadError, match=error_at(path, "zero-size dimension")):
            read(path)


@pytest.mark.parametrize("shape", [(0, 5, 6), (6, 5, 0)])
def test_zero_size_nifti(tmp_path, shape):
    # nibabel writes a NIfTI with a 0-length axis; ITK alone either rejects its header or reads it
    # as if the axis had length 1, so this checks that the reader names the real problem.
    path = tmp_path / "empty.nii"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), path)
    for read in (read_info, read_image):
        with pytest.raises(ImageReadError, match=error_at(path, "zero-size dimension")):
            read(path)


def test_multi_page_tiff(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((3, 8, 8), np.uint8), photometric="minisblack")
    for read in (read_info, read_image):
        with pytest.raises(ImageReadError, match=error_at(path, re.escape("multi-page TIFF (3 pages)"))):
            read(path)


def test_read_error_is_a_value_error(tmp_path):
    # Callers that catch ValueError (the DataError base) also catch unreadable files.
    path = tmp_path / "x.pdf"
    path.write_text("x")
    with pytest.raises(ValueError):
        read_image(path)


def test_dicom_without_suffix_is_recognised(tmp_path):
    path = tmp_path / "IM0001"
    shutil.copyfile(dicom_file("MR_small.dcm"), path)
    image = read_image(path)
    np.testing.assert_array_equal(image.array[0], raw_pixels(str(path)))
