"""Readers for 2D images (PNG, JPEG, BMP, TIFF, DICOM) and 3D volumes (NIfTI, MHA/MHD, NRRD, DICOM).

Two entry points, both dispatching on the file suffix (or, for a folder, on its DICOM content):

- :func:`read_info` reads only the header: shape, channels, dtype, spacing. Cheap.
- :func:`read_image` decodes the pixels into a :class:`~medfusion.data.image.MedicalImage`.

Files from someone else are not trusted: only regular files (and folders, for a DICOM series) are
ever opened, so a FIFO, socket or device can not make a reader block; and an image whose header
declares more than :func:`max_pixels` pixels or voxels is refused before any pixel is decoded (a
few-kilobyte PNG can declare 20000x20000 16-bit RGB pixels, 2.4 GB once decoded).

Values are kept as stored: 16-bit stays 16-bit, grayscale stays one channel, RGB stays three, and
nothing is cut to three channels. The only conversions are those the format itself prescribes:
DICOM rescale slope/intercept (the modality LUT) is applied, MONOCHROME1 is inverted so that
higher always means brighter, YBR and palette colour are expanded to RGB. Every failure raises
:class:`~medfusion.data.errors.ImageReadError` naming the file.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import struct
import threading
import warnings
from pathlib import Path

import numpy as np

from medfusion.data.errors import ImageReadError
from medfusion.data.image import ImageInfo, MedicalImage, identity_direction
from medfusion.utils import full_suffix

RASTER_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".bmp": "bmp"}
TIFF_FORMATS = {".tif": "tiff", ".tiff": "tiff"}
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
VOLUME_FORMATS = {
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".mha": "metaimage",
    ".mhd": "metaimage",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
}
# Files that may sit beside images and are not samples themselves (MetaImage/NRRD detached data,
# BIDS sidecars, notes, label tables). They are ignored, never reported as bad files.
SIDECAR_SUFFIXES = (".raw", ".zraw", ".json", ".csv", ".tsv", ".txt", ".md", ".bval", ".bvec")
IMAGE_SUFFIXES = (*RASTER_FORMATS, *TIFF_FORMATS, *DICOM_SUFFIXES, *VOLUME_FORMATS)

_PIL_MODES = {  # PIL mode -> (channels, numpy dtype)
    "1": (1, "uint8"),
    "L": (1, "uint8"),
    "LA": (2, "uint8"),
    "RGB": (3, "uint8"),
    "RGBA": (4, "uint8"),
    "CMYK": (4, "uint8"),
    "I;16": (1, "uint16"),
    "I;16L": (1, "uint16"),
    "I;16B": (1, "uint16"),
    "I": (1, "int32"),
    "F": (1, "float32"),
}


MAX_PIXELS_ENV = "MEDFUSION_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 2**28  # 16384 x 16384 pixels, or 645^3 voxels


def max_pixels() -> int:
    """The largest number of pixels (2D) or voxels (3D) an image may hold, channels not counted.

    Read from the environment variable :data:`MAX_PIXELS_ENV` (``MEDFUSION_MAX_PIXELS``) at every
    call, so that DataLoader worker processes see the value their parent set; default
    :data:`DEFAULT_MAX_PIXELS`. Raises ``ValueError`` naming the variable when it is not a whole
    number >= 1.
    """
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"environment variable {MAX_PIXELS_ENV}={text!r} is not a valid pixel limit: give a whole "
            f"number of pixels/voxels >= 1 (default {DEFAULT_MAX_PIXELS})"
        )
    return value


def _check_size(path: str | os.PathLike, shape: tuple[int, ...], channels: int) -> None:
    """Refuse an image whose header declares more pixels/voxels than :func:`max_pixels`."""
    limit = max_pixels()
    count = math.prod(int(s) for s in shape)
    if count > limit:
        unit = "pixels" if len(shape) == 2 else "voxels"
        raise ImageReadError(
            path,
            f"too large: {'x'.join(str(s) for s in shape)} = {count:,} {unit} (with {channels} "
            f"channel(s)), over the limit of {limit:,} {unit} per image (channels not counted); "
            f"set {MAX_PIXELS_ENV} to a larger number to read it",
        )


_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISCHR, "a character device"),
)


def file_problem(path: str | os.PathLike, folder_ok: bool = False) -> str | None:
    """Why ``path`` must not be opened as an image, or None for a regular file (or a folder when
    ``folder_ok``). Judged with ``os.stat`` alone: nothing is opened.

    Symbolic links are followed; a dangling link or a link loop is named as such.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop (the link leads back to itself); remove or fix the link"
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        if e.errno == errno.ENOENT:
            return "no such file"
        return f"cannot be read: {e.strerror}"
    if stat.S_ISREG(mode) or (folder_ok and stat.S_ISDIR(mode)):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    return f"is {kind}, not a regular file; it is not opened"


def has_dicom_preamble(path: str | os.PathLike) -> bool:
    """True when the file carries the DICOM Part 10 magic ``DICM`` at byte 128 (regular files
    only: a FIFO or device is never opened)."""
    if file_problem(path) is not None:
        return False
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A DICOM file by suffix, or a suffix-less file with the DICOM preamble."""
    suffix = full_suffix(path)
    return suffix in DICOM_SUFFIXES or (suffix == "" and has_dicom_preamble(path))


def is_image_file(path: str | os.PathLike) -> bool:
    """True for files whose suffix (or DICOM preamble) one of the readers takes."""
    return full_suffix(path) in IMAGE_SUFFIXES or is_dicom_file(path)


def format_of(path: str | os.PathLike) -> str:
    """The reader name for ``path``; raises :class:`ImageReadError` for unsupported files."""
    path = Path(path)
    problem = file_problem(path, folder_ok=True)
    if problem is not None:
        raise ImageReadError(path, problem)
    if path.is_dir():
        return "dicom-series"
    suffix = full_suffix(path)
    for table in (RASTER_FORMATS, TIFF_FORMATS, VOLUME_FORMATS):
        if suffix in table:
            return table[suffix]
    if is_dicom_file(path):
        return "dicom"
    supported = ", ".join(sorted({*IMAGE_SUFFIXES, "a DICOM series folder"}))
    raise ImageReadError(
        path, f"not a supported image or volume (suffix {suffix or 'none'!r}; supported: {supported})"
    )


def read_info(path: str | os.PathLike) -> ImageInfo:
    """Read the header of an image, volume or DICOM series folder.

    Args:
        path: a file, or a folder holding one DICOM series.

    Returns:
        The :class:`ImageInfo`; raises :class:`ImageReadError` when it cannot be read, is not a
        regular file (or folder), has a zero-size dimension or more pixels than
        :func:`max_pixels`.
    """
    max_pixels()  # a bad MEDFUSION_MAX_PIXELS is a ValueError, never blamed on the file
    fmt = format_of(path)
    try:
        info = _INFO_READERS[fmt](Path(path), fmt)
    except ImageReadError:
        raise
    except Exception as e:  # every library raises its own types; name the file whatever it was
        raise ImageReadError(path, f"cannot read header as {fmt}: {_describe(e)}") from e
    _check_nonempty(path, info.shape)
    _check_size(path, info.shape, info.channels)
    return info


def read_image(path: str | os.PathLike, check_finite: bool = True) -> MedicalImage:
    """Decode an image, volume or DICOM series folder.

    Args:
        path: a file, or a folder holding one DICOM series.
        check_finite: raise when float data holds NaN or Inf values.

    Returns:
        A :class:`MedicalImage` with ``array`` of shape ``(C, *spatial)`` in the stored dtype
        (after DICOM rescale). Every reader checks the size its header declares against
        :func:`max_pixels` before decoding.
    """
    max_pixels()
    fmt = format_of(path)
    try:
        image = _IMAGE_READERS[fmt](Path(path), fmt)
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(path, f"cannot read as {fmt} (corrupt or truncated?): {_describe(e)}") from e
    _check_nonempty(path, image.spatial_shape)
    if check_finite and np.issubdtype(image.array.dtype, np.floating):
        bad = int(np.size(image.array) - np.count_nonzero(np.isfinite(image.array)))
        if bad:
            raise ImageReadError(path, f"contains {bad} NaN/Inf values")
    return image


def _describe(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _check_nonempty(path: str | os.PathLike, shape: tuple[int, ...]) -> None:
    if any(s == 0 for s in shape):
        raise ImageReadError(path, f"has a zero-size dimension: shape {tuple(shape)}")


def _unit_geometry(spatial_dims: int, spacing: tuple[float, ...] | None = None) -> dict:
    return dict(
        spacing=spacing or (1.0,) * spatial_dims,
        origin=(0.0,) * spatial_dims,
        direction=identity_direction(spatial_dims),
    )


# --------------------------------------------------------------------------------------------
# PNG / JPEG / BMP through Pillow (16-bit colour PNG through SimpleITK: Pillow truncates it)


def _png_header(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR, or None when the signature is wrong."""
    with open(path, "rb") as f:
        head = f.read(29)
    if len(head) < 29 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    bit_depth, colour_type = struct.unpack(">BB", head[24:26])
    return bit_depth, colour_type


def _is_16bit_colour_png(path: Path, fmt: str) -> bool:
    if fmt != "png":
        return False
    header = _png_header(path)
    return header is not None and header[0] == 16 and header[1] in (2, 4, 6)


_PIL_LOCK = threading.Lock()


def _open_pil(path: Path):
    """Open lazily (header only). Pillow's own pixel limit is lifted for the call: the one limit
    that applies is :func:`max_pixels`, which the callers check before decoding."""
    from PIL import Image

    with _PIL_LOCK:
        pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        except Exception as e:
            raise ImageReadError(path, f"not a readable image: {_describe(e)}") from e
        finally:
            Image.MAX_IMAGE_PIXELS = pillow_limit


def _pil_mode(path: Path, im) -> tuple[int, str]:
    mode = im.mode
    if mode == "P":  # palette: indices into a colour table; expanded to RGB(A) when decoded
        return (4 if "transparency" in im.info else 3), "uint8"
    if mode not in _PIL_MODES:
        raise ImageReadError(path, f"unsupported pixel mode {mode!r}")
    channels, dtype = _PIL_MODES[mode]
    header = _png_header(path) if mode == "I" else None
    if header is not None and header[0] == 16:
        dtype = "uint16"  # Pillow opens some 16-bit grayscale PNGs as 32-bit "I"
    return channels, dtype


def _raster_info(path: Path, fmt: str) -> ImageInfo:
    if _is_16bit_colour_png(path, fmt):
        return _sitk_info(path, fmt)
    with _open_pil(path) as im:
        channels, dtype = _pil_mode(path, im)
        width, height = im.size
    return ImageInfo(str(path), fmt, 2, (height, width), channels, dtype, (1.0, 1.0))


def _raster_image(path: Path, fmt: str) -> MedicalImage:
    if _is_16bit_colour_png(path, fmt):
        return _sitk_image(path, fmt)
    with _open_pil(path) as im:
        channels, dtype = _pil_mode(path, im)
        _check_size(path, im.size[::-1], channels)
        if im.mode == "P":
            im = im.convert("RGBA" if channels == 4 else "RGB")
        im.load()  # decodes fully: a truncated file raises here
        array = np.asarray(im)
    array = array.astype(dtype, copy=False)
    array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    return MedicalImage(array=np.ascontiguousarray(array), path=str(path), **_unit_geometry(2))


# --------------------------------------------------------------------------------------------
# TIFF through tifffile (8/16/32-bit, any number of samples per pixel)


def _tiff_page(path: Path, tif):
    if len(tif.pages) != 1:
        raise ImageReadError(
            path,
            f"multi-page TIFF ({len(tif.pages)} pages) is not read as one 2D image; "
            "store a volume as NIfTI/MHA, or one page per file",
        )
    return tif.pages[0]


def _tiff_layout(path: Path, page) -> tuple[tuple[int, int], int]:
    axes, shape = page.axes, page.shape
    if axes == "YX":
        return (shape[0], shape[1]), 1
    if axes == "YXS":
        return (shape[0], shape[1]), shape[2]
    if axes == "SYX":
        return (shape[1], shape[2]), shape[0]
    raise ImageReadError(path, f"unsupported TIFF layout {axes} with shape {shape}")


def _tiff_info(path: Path, fmt: str) -> ImageInfo:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = _tiff_page(path, tif)
        shape, channels = _tiff_layout(path, page)
        return ImageInfo(str(path), fmt, 2, shape, channels, np.dtype(page.dtype).name, (1.0, 1.0))


def _tiff_image(path: Path, fmt: str) -> MedicalImage:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = _tiff_page(path, tif)
        shape, channels = _tiff_layout(path, page)
        _check_nonempty(path, shape)  # before decoding a 0-row page
        _check_size(path, shape, channels)
        array = page.asarray()
        axes = page.axes
    if axes == "YX":
        array = array[None]
    elif axes == "YXS":
        array = np.moveaxis(array, -1, 0)
    return MedicalImage(array=np.ascontiguousarray(array), path=str(path), **_unit_geometry(2))


# --------------------------------------------------------------------------------------------
# DICOM files through pydicom (SimpleITK/GDCM when pydicom lacks a decoder); multi-frame as 3D


def _dcmread(path: Path, header_only: bool):
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # Large elements (the pixel data) are read only when accessed, so a multi-frame file
            # decoded by SimpleITK is not also loaded here.
            return pydicom.dcmread(path, stop_before_pixels=header_only, defer_size="64 KB")
        except Exception as e:
            raise ImageReadError(path, f"not a readable DICOM file: {_describe(e)}") from e


def _dicom_frames(ds) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _dicom_spacing(ds) -> tuple[float, float]:
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        if value is not None and len(value) == 2:
            row, col = float(value[0]), float(value[1])
            if row > 0 and col > 0:
                return col, row  # physical (x, y) = (column spacing, row spacing)
    return 1.0, 1.0


def _dicom_channels(ds) -> int:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        return 3
    return int(ds.get("SamplesPerPixel", 1))


def _rescale(ds) -> tuple[float, float]:
    return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)


def _stored_range(ds) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _rescaled_range(ds) -> tuple[float, float]:
    slope, intercept = _rescale(ds)
    low, high = _stored_range(ds)
    return tuple(sorted((low * slope + intercept, high * slope + intercept)))


def _dicom_dtype(ds) -> str:
    """The smallest dtype that holds every stored value after the rescale slope/intercept."""
    slope, intercept = _rescale(ds)
    if slope != int(slope) or intercept != int(intercept):
        return "float32"
    low, high = _rescaled_range(ds)
    for dtype in ("uint8", "int8", "uint16", "int16", "uint32", "int32"):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    return "float64"


def _dicom_info(path: Path, fmt: str, ds=None) -> ImageInfo:
    ds = ds if ds is not None else _dcmread(path, header_only=True)
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageReadError(path, "DICOM file holds no image (no Rows/Columns)")
    if _dicom_frames(ds) > 1:
        # read_image decodes multi-frame files through SimpleITK/GDCM, which takes spacing and pixel
        # type from the functional groups (or GridFrameOffsetVector): read the header the same way.
        return _sitk_info(path, fmt)
    x, y = _dicom_spacing(ds)
    shape2d = (int(ds.Rows), int(ds.Columns))
    return ImageInfo(str(path), fmt, 2, shape2d, _dicom_channels(ds), _dicom_dtype(ds), (x, y))


def _invert_monochrome1(array: np.ndarray, ds) -> np.ndarray:
    """MONOCHROME1 shows low values bright: mirror within the stored range (after rescale)."""
    low, high = _rescaled_range(ds)
    inverted = (low + high) - array.astype(np.float64)
    return inverted.astype(array.dtype) if np.issubdtype(array.dtype, np.floating) else inverted


def _to_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        array = np.clip(np.rint(array), info.min, info.max)
    return array.astype(dtype, copy=False)


def _dicom_pixels(path: Path, ds) -> np.ndarray:
    """Decoded, rescaled pixels in (frames,) rows, cols(, samples) layout."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array
    except Exception as e:
        if not ds.file_meta.TransferSyntaxUID.is_compressed:
            raise ImageReadError(path, f"corrupt or truncated DICOM pixel data: {_describe(e)}") from e
        # GDCM decodes what pydicom has no plugin for; it applies the rescale and inverts
        # MONOCHROME1 itself, like the other SimpleITK paths below.
        import SimpleITK as sitk

        try:
            pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        except Exception as e2:
            raise ImageReadError(path, f"cannot decode DICOM pixel data: {_describe(e)}") from e2
        return pixels[0] if _dicom_frames(ds) == 1 else pixels
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        return apply_color_lut(pixels, ds)
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        return pixels
    pixels = apply_modality_lut(pixels, ds)
    if photometric == "MONOCHROME1":
        pixels = _invert_monochrome1(pixels, ds)
    return pixels


def _dicom_image(path: Path, fmt: str) -> MedicalImage:
    ds = _dcmread(path, header_only=False)
    if "PixelData" not in ds:
        raise ImageReadError(path, "DICOM file holds no pixel data")
    info = _dicom_info(path, fmt, ds)
    _check_size(path, info.shape, info.channels)
    if info.spatial_dims == 3:  # multi-frame: a volume, through SimpleITK/GDCM like a series
        return _sitk_image(path, fmt).replace(modality=str(ds.get("Modality", "")))
    pixels = _dicom_pixels(path, ds)
    pixels = _to_dtype(np.asarray(pixels), info.dtype)
    pixels = np.moveaxis(pixels, -1, 0) if info.channels > 1 else pixels[None]
    return MedicalImage(
        array=np.ascontiguousarray(pixels),
        path=str(path),
        modality=str(ds.get("Modality", "")),
        **_unit_geometry(info.spatial_dims, info.spacing),
    )


# --------------------------------------------------------------------------------------------
# MetaImage, NRRD (and 16-bit colour PNG) through SimpleITK; a 4D scalar volume is read as channels


def _sitk_layout(path: Path, dimension: int, size: tuple[int, ...], components: int):
    """(spatial_dims, spatial size in array order, channels) from an ITK header."""
    if dimension in (2, 3):
        return dimension, tuple(reversed(size)), components
    if dimension == 4 and components == 1:
        return 3, tuple(reversed(size[:3])), size[3]
    raise ImageReadError(
        path, f"unsupported {dimension}D image with {components} components per voxel (size {size})"
    )


def _sitk_header(path: Path, fmt: str):
    """(reader with the header read, spatial_dims, spatial size in array order, channels)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ImageReadError(path, f"not a readable {fmt} file: {_describe(e)}") from e
    size = tuple(int(s) for s in reader.GetSize())
    return reader, *_sitk_layout(path, reader.GetDimension(), size, reader.GetNumberOfComponents())


def _sitk_info(path: Path, fmt: str) -> ImageInfo:
    import SimpleITK as sitk

    reader, spatial_dims, shape, channels = _sitk_header(path, fmt)
    dtype = np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1] * 2, reader.GetPixelID())).dtype).name
    # ReadImage makes a negative spacing positive (flipping the direction); the header reader does not
    spacing = tuple(abs(float(s)) for s in reader.GetSpacing()[:spatial_dims])
    return ImageInfo(str(path), fmt, spatial_dims, shape, channels, dtype, spacing)


def _sitk_to_medical(path: Path, image, modality: str = "") -> MedicalImage:
    import SimpleITK as sitk

    size = tuple(int(s) for s in image.GetSize())
    dimension = image.GetDimension()
    components = image.GetNumberOfComponentsPerPixel()
    spatial_dims, _, _ = _sitk_layout(path, dimension, size, components)
    array = sitk.GetArrayFromImage(image)  # (*reversed size) (+ components)
    if components > 1:
        array = np.moveaxis(array, -1, 0)
    elif dimension == 4:
        pass  # (T, D, H, W): the fourth axis is already first
    else:
        array = array[None]
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(dimension, dimension)
    return MedicalImage(
        array=np.ascontiguousarray(array),
        spacing=tuple(float(s) for s in image.GetSpacing()[:spatial_dims]),
        origin=tuple(float(s) for s in image.GetOrigin()[:spatial_dims]),
        direction=tuple(direction[:spatial_dims, :spatial_dims].ravel().tolist()),
        path=str(path),
        modality=modality,
    )


def _sitk_image(path: Path, fmt: str) -> MedicalImage:
    reader, _, shape, channels = _sitk_header(path, fmt)
    _check_nonempty(path, shape)
    _check_size(path, shape, channels)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise ImageReadError(path, f"cannot read as {fmt} (corrupt or truncated?): {_describe(e)}") from e
    return _sitk_to_medical(path, image)


# --------------------------------------------------------------------------------------------
# NIfTI through nibabel: lazy (header first, data on demand), and NaN kept as NaN (ITK's NIfTI
# reader turns NaN into 0, which would hide corrupt volumes). Geometry converted to ITK's LPS.

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _nifti_load(path: Path):
    import nibabel

    try:
        return nibabel.load(path)
    except Exception as e:
        raise ImageReadError(path, f"not a readable NIfTI file: {_describe(e)}") from e


def _nifti_layout(path: Path, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...], int]:
    """(spatial_dims, spatial size in array order, channels) from a NIfTI shape (x, y, z, t, c)."""
    _check_nonempty(path, shape)
    if len(shape) == 2:
        return 2, shape[::-1], 1
    if len(shape) == 3:
        return 3, shape[::-1], 1
    if len(shape) == 4:  # (x, y, z, t): the fourth axis holds channels (e.g. MR sequences)
        return 3, shape[2::-1], shape[3]
    if len(shape) == 5 and shape[3] == 1:  # (x, y, z, 1, c): vector voxels
        if shape[2] == 1:  # (x, y, 1, 1, c): how ITK writes a 2D image with channels, and reads it
            return 2, shape[1::-1], shape[4]
        return 3, shape[2::-1], shape[4]
    raise ImageReadError(path, f"unsupported NIfTI shape {shape}; expected 2D, 3D or 3D with channels")


def _nifti_scaled(img) -> bool:
    slope, inter = img.dataobj.slope, img.dataobj.inter
    return not (slope in (None, 1.0) and inter in (None, 0.0))


def _nifti_dtype(img) -> str:
    return "float32" if _nifti_scaled(img) else np.dtype(img.get_data_dtype()).name


def _nifti_geometry(img, spatial_dims: int) -> dict:
    affine = np.asarray(img.affine, dtype=np.float64)
    matrix = _RAS_TO_LPS @ affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    spacing[spacing == 0] = 1.0
    direction = matrix / spacing
    origin = _RAS_TO_LPS @ affine[:3, 3]
    d = spatial_dims
    return dict(
        spacing=tuple(float(v) for v in spacing[:d]),
        origin=tuple(float(v) for v in origin[:d]),
        direction=tuple(float(v) for v in direction[:d, :d].ravel()),
    )


def _nifti_info(path: Path, fmt: str) -> ImageInfo:
    img = _nifti_load(path)
    shape = tuple(int(v) for v in img.shape)
    spatial_dims, spatial, channels = _nifti_layout(path, shape)
    spacing = _nifti_geometry(img, spatial_dims)["spacing"]
    return ImageInfo(str(path), fmt, spatial_dims, tuple(spatial), channels, _nifti_dtype(img), spacing)


def _nifti_image(path: Path, fmt: str) -> MedicalImage:
    img = _nifti_load(path)
    shape = tuple(int(v) for v in img.shape)
    spatial_dims, spatial, channels = _nifti_layout(path, shape)
    _check_size(path, spatial, channels)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise ImageReadError(path, f"cannot read NIfTI data (corrupt or truncated?): {_describe(e)}") from e
    if _nifti_scaled(img):
        data = data.astype(np.float32, copy=False)
    if len(shape) == 5:
        data = data[:, :, :, 0, :]
    # (x, y, z, c) -> (c, z, y, x); (x, y[, z]) -> (1, [z,] y, x)
    array = data.transpose(3, 2, 1, 0) if len(shape) in (4, 5) else data.T[None]
    if spatial_dims == 2 and array.ndim == 4:
        array = array[:, 0]  # (c, 1, y, x) -> (c, y, x)
    return MedicalImage(
        array=np.ascontiguousarray(array), path=str(path), **_nifti_geometry(img, spatial_dims)
    )


# --------------------------------------------------------------------------------------------
# A folder holding one DICOM series


def dicom_series_files(folder: str | os.PathLike) -> list[str]:
    """The files of the one DICOM series in ``folder``, sorted along the slice axis."""
    import SimpleITK as sitk

    folder = Path(folder)
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(series) == 0:
        raise ImageReadError(folder, "folder holds no DICOM series")
    if len(series) > 1:
        raise ImageReadError(
            folder, f"folder holds {len(series)} DICOM series; a volume folder must hold exactly one"
        )
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))


def _series_info(path: Path, fmt: str, files: list[str] | None = None) -> ImageInfo:
    files = files if files is not None else dicom_series_files(path)
    first = _dicom_info(Path(files[0]), "dicom")
    z = 1.0
    if len(files) > 1:
        a, b = (_dcmread(Path(f), header_only=True) for f in files[:2])
        pa, pb = a.get("ImagePositionPatient"), b.get("ImagePositionPatient")
        if pa is not None and pb is not None:
            z = float(np.linalg.norm(np.asarray(pb, float) - np.asarray(pa, float))) or 1.0
    return ImageInfo(
        str(path), fmt, 3, (len(files), *first.shape), first.channels, first.dtype, (*first.spacing, z)
    )


def _series_image(path: Path, fmt: str) -> MedicalImage:
    import SimpleITK as sitk

    files = dicom_series_files(path)
    info = _series_info(path, fmt, files)
    _check_size(path, info.shape, info.channels)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise ImageReadError(path, f"cannot read DICOM series (corrupt slice?): {_describe(e)}") from e
    ds = _dcmread(Path(files[0]), header_only=True)
    return _sitk_to_medical(path, image, modality=str(ds.get("Modality", "")))


_INFO_READERS = {
    "png": _raster_info,
    "jpeg": _raster_info,
    "bmp": _raster_info,
    "tiff": _tiff_info,
    "dicom": _dicom_info,
    "nifti": _nifti_info,
    "metaimage": _sitk_info,
    "nrrd": _sitk_info,
    "dicom-series": _series_info,
}
_IMAGE_READERS = {
    "png": _raster_image,
    "jpeg": _raster_image,
    "bmp": _raster_image,
    "tiff": _tiff_image,
    "dicom": _dicom_image,
    "nifti": _nifti_image,
    "metaimage": _sitk_image,
    "nrrd": _sitk_image,
    "dicom-series": _series_image,
}
