"""Writers for 2D images (PNG 8/16-bit, TIFF) and volumes (NIfTI, MHA, NRRD) with their geometry.

Every writer goes through :func:`medfusion.utils.atomic_path`: the file appears under its final
name only once complete, so an interrupted run never leaves a half-written file. Before the
rename every file is read back and compared with what was meant to be written (some writers,
SimpleITK's among them, do not report a full disk), so a file under its final name is a whole
one; :func:`written_file_problem` checks files that an earlier run left (resume).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfusion.data.image import MedicalImage
from medfusion.utils import atomic_path, full_suffix, write_error

PNG_SUFFIXES = (".png",)
TIFF_SUFFIXES = (".tif", ".tiff")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".nrrd")
WRITABLE_SUFFIXES = (*PNG_SUFFIXES, *TIFF_SUFFIXES, *VOLUME_SUFFIXES)


def to_unsigned(array: np.ndarray, bit_depth: int) -> np.ndarray:
    """Map float values in [-1, 1] onto the full range of an unsigned integer type.

    Args:
        array: floats in [-1, 1]; values outside are clipped.
        bit_depth: 8 or 16.

    Returns:
        ``uint8`` or ``uint16`` array of the same shape.
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16; got {bit_depth!r}")
    top = 2**bit_depth - 1
    scaled = (np.clip(np.asarray(array, dtype=np.float64), -1.0, 1.0) + 1.0) * (top / 2.0)
    return np.rint(scaled).astype(np.uint8 if bit_depth == 8 else np.uint16)


def write_image(path: str | os.PathLike, image: MedicalImage | np.ndarray) -> Path:
    """Write ``image`` to ``path`` in the format its suffix names, atomically.

    Args:
        path: target file; ``.png``, ``.tif``/``.tiff``, ``.nii``, ``.nii.gz``, ``.mha`` or
            ``.nrrd``.
        image: a :class:`MedicalImage` or an array of shape ``(C, *spatial)`` (unit geometry).
            PNG takes ``uint8`` (8-bit) or ``uint16`` (16-bit) with 1, 3 or 4 channels; convert
            floats with :func:`to_unsigned` first.

    Returns:
        The written path.
    """
    path = Path(path)
    if not isinstance(image, MedicalImage):
        image = MedicalImage.from_array(np.asarray(image))
    array = np.asarray(image.array.detach().cpu() if hasattr(image.array, "detach") else image.array)
    suffix = full_suffix(path)
    if suffix in PNG_SUFFIXES:
        _check_png(path, array)
        writer = _write_png
    elif suffix in TIFF_SUFFIXES:
        _check_2d(path, array)
        writer = _write_tiff
    elif suffix in VOLUME_SUFFIXES:
        writer = _write_sitk
    else:
        raise ValueError(
            f"{path}: cannot write suffix {suffix or 'none'!r}; choose one of {', '.join(WRITABLE_SUFFIXES)}"
        )
    with atomic_path(path) as tmp:  # a full disk or a permission error is named by ``path``
        try:
            writer(tmp, image, array)
        except RuntimeError as e:  # SimpleITK reports I/O failures as RuntimeError
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else "the writer failed"
            raise write_error(path, reason) from e
        _verify(tmp, path, array)
    return path


def _verify(tmp: Path, path: Path, array: np.ndarray) -> None:
    """Read ``tmp`` back and compare it with ``array``; raise naming ``path`` when it differs."""
    from medfusion.data.errors import ImageReadError
    from medfusion.data.readers import read_image

    if tmp.stat().st_size == 0:
        raise write_error(path, "the file is empty after writing")
    try:
        back = np.asarray(read_image(tmp, check_finite=False).array)
    except ImageReadError as e:
        raise write_error(path, f"the file does not read back ({e.reason})") from e
    if back.shape != array.shape or back.dtype != array.dtype:
        raise write_error(
            path,
            f"the file reads back as {back.dtype}{list(back.shape)}, not {array.dtype}{list(array.shape)}",
        )
    if not np.array_equal(back, array, equal_nan=np.issubdtype(array.dtype, np.floating)):
        raise write_error(path, "the file reads back with other values")


def written_file_problem(path: str | os.PathLike, shape: tuple[int, ...], dtype: str) -> str | None:
    """What is wrong with a file that should hold an image of ``shape`` ``(C, *spatial)`` and
    ``dtype`` (a file an earlier, perhaps killed, run wrote), or None when it looks whole.

    Checked: the size, the header (shape, channels, dtype), and then the data: gzip files
    (``.nii.gz``, possibly large volumes) by the length in their trailer, every other file by
    decoding it.
    """
    from medfusion.data.errors import ImageReadError
    from medfusion.data.readers import read_image, read_info

    path = Path(path)
    if not path.is_file():
        return "missing or not a file"
    if path.stat().st_size == 0:
        return "empty"
    try:
        info = read_info(path)
    except ImageReadError as e:
        return e.reason
    found, wanted = (info.channels, *info.shape), tuple(int(s) for s in shape)
    if found != wanted or info.dtype != np.dtype(dtype).name:
        return f"holds {info.dtype} {list(found)}, expected {np.dtype(dtype).name} {list(wanted)}"
    if full_suffix(path) == ".nii.gz":
        return _gzip_problem(path, _nifti_bytes(path, wanted, dtype))
    try:
        read_image(path, check_finite=False)
    except ImageReadError as e:
        return e.reason
    return None


def _nifti_bytes(path: Path, shape: tuple[int, ...], dtype: str) -> int:
    import nibabel

    offset = int(nibabel.load(path).dataobj.offset)
    return offset + int(np.prod(shape)) * np.dtype(dtype).itemsize


def _gzip_problem(path: Path, expected: int) -> str | None:
    """A gzip stream ends with the length of its data mod 2**32; a cut file ends elsewhere."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        (length,) = struct.unpack("<I", f.read(4))
    if length != expected % 2**32:
        return "the compressed file is cut short or damaged (its gzip trailer does not match)"
    return None


def _check_2d(path: Path, array: np.ndarray) -> None:
    if array.ndim != 3:
        raise ValueError(f"{path}: a 2D image needs shape (C, H, W); got {array.shape}")


def _check_png(path: Path, array: np.ndarray) -> None:
    _check_2d(path, array)
    if array.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"{path}: PNG holds uint8 or uint16 values; got {array.dtype} "
            "(convert with medfusion.data.to_unsigned)"
        )
    if array.shape[0] not in (1, 3, 4):
        raise ValueError(
            f"{path}: PNG holds 1, 3 or 4 channels; got {array.shape[0]} (write .tif or .nii.gz instead)"
        )


def _to_sitk(image: MedicalImage, array: np.ndarray):
    import SimpleITK as sitk

    if image.channels == 1:
        itk = sitk.GetImageFromArray(array[0])
    else:
        itk = sitk.GetImageFromArray(np.moveaxis(array, 0, -1), isVector=True)
    itk.SetSpacing([float(s) for s in image.spacing])
    itk.SetOrigin([float(o) for o in image.origin])
    itk.SetDirection([float(d) for d in image.direction])
    return itk


def _write_png(tmp: Path, image: MedicalImage, array: np.ndarray) -> None:
    import SimpleITK as sitk  # writes 8- and 16-bit, gray and colour alike (Pillow cannot do 16-bit RGB)

    sitk.WriteImage(_to_sitk(MedicalImage.from_array(array), array), str(tmp))


def _write_tiff(tmp: Path, image: MedicalImage, array: np.ndarray) -> None:
    import tifffile

    if image.channels == 1:
        tifffile.imwrite(tmp, array[0], photometric="minisblack")
        return
    # Say how the samples are laid out: left to guess, tifffile stores (H, W, 5) as 5 pages and
    # (3, W, 2) as RGB planes, which read back as a multi-page TIFF or with the wrong shape.
    photometric = "rgb" if image.channels in (3, 4) else "minisblack"
    tifffile.imwrite(tmp, np.moveaxis(array, 0, -1), photometric=photometric, planarconfig="contig")


def _write_sitk(tmp: Path, image: MedicalImage, array: np.ndarray) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(_to_sitk(image, array), str(tmp), useCompression=True)


@dataclass(frozen=True)
class IntensityMapping:
    """How generated values in [-1, 1] become stored values: ``low + (x + 1) / 2 * (high - low)``
    per channel (one ``low``/``high`` each, or one for every channel) in ``dtype`` (rounded for
    integer types). ``physical`` says whether the stored values are in the training data's own
    units (an exact inverse of its normalisation) or a relative scale."""

    dtype: str
    low: tuple[float, ...]
    high: tuple[float, ...]
    physical: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "low", tuple(float(v) for v in np.atleast_1d(self.low)))
        object.__setattr__(self, "high", tuple(float(v) for v in np.atleast_1d(self.high)))
        if len(self.low) != len(self.high):
            raise ValueError(
                f"low and high must have one value per channel alike; got {self.low}, {self.high}"
            )

    def __call__(self, array) -> np.ndarray:
        """``array`` (C, *spatial) in [-1, 1] (clipped) -> stored values."""
        x = np.clip(np.asarray(array, dtype=np.float64), -1.0, 1.0)
        shape = (-1,) + (1,) * (x.ndim - 1)
        low, high = np.asarray(self.low).reshape(shape), np.asarray(self.high).reshape(shape)
        if low.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"the mapping has values for {low.shape[0]} channels; the image has {x.shape[0]}"
            )
        values = low + (x + 1.0) * ((high - low) / 2.0)
        dtype = np.dtype(self.dtype)
        return np.rint(values).astype(dtype) if np.issubdtype(dtype, np.integer) else values.astype(dtype)

    def describe(self) -> str:
        scale = "the training data's units" if self.physical else "a relative scale"
        ranges = ", ".join(f"[{lo:g}, {hi:g}]" for lo, hi in zip(self.low, self.high))
        per = " per channel" if len(self.low) > 1 else ""
        return f"[-1, 1] -> {ranges}{per} as {self.dtype} ({scale})"


# what each 2D/3D format can store: PNG holds unsigned 8/16-bit values only
PNG_DTYPES = ("uint8", "uint16")


def intensity_mapping(
    suffix: str, source_dtype: str = "uint8", normalization: dict | None = None, label: str | None = None
) -> IntensityMapping:
    """How to store generated images in a ``suffix`` file like training data of ``source_dtype``.

    When the model's normalisation maps every image alike (``dtype``, ``window``, ``dataset``: see
    :mod:`medfusion.data.transforms`), its inverse gives the training data's own units: stored in
    the source dtype where the range fits it (integer data stays integer), else as float32. A
    format that cannot hold that type (PNG: unsigned 8/16-bit only), and a per-image normalisation
    (``percentile``, ``minmax``, or ``auto`` of a model trained before normalisations were
    fitted), get the full unsigned 8-bit (for 1-byte training data) or 16-bit range instead: a
    relative scale, and the card says so.

    Args:
        suffix: the file format, e.g. ``.png``, ``.tif`` or ``.nii.gz``.
        source_dtype: numpy dtype name of the training files.
        normalization: the model's normalisation record (``normalization`` mode, ``window``,
            ``bounds``, ``class_bounds``).
        label: the class of the images (their own bounds where ``class_bounds`` has them).
    """
    from medfusion.data.transforms import CT_WINDOW

    try:
        source = np.dtype(source_dtype)
    except TypeError as e:
        raise ValueError(f"source_dtype {source_dtype!r} is not a numpy dtype") from e
    if suffix not in WRITABLE_SUFFIXES:
        raise ValueError(f"cannot write suffix {suffix!r}; choose one of {', '.join(WRITABLE_SUFFIXES)}")
    record = normalization or {}
    bits = 8 if source.itemsize == 1 else 16
    relative = IntensityMapping(f"uint{bits}", 0.0, float(2**bits - 1), physical=False)
    mode = record.get("normalization", "auto")
    if mode == "auto" and source == np.uint8:
        mode = "dtype"  # what 'auto' picks for 8-bit data
    if mode == "dtype" and np.issubdtype(source, np.integer):
        low, high = (float(np.iinfo(source).min),), (float(np.iinfo(source).max),)
    elif mode == "window":
        low, high = ((float(v),) for v in (record.get("window") or CT_WINDOW))
    elif mode == "dataset" and record.get("bounds"):
        bounds = (record.get("class_bounds") or {}).get(label) or record["bounds"]
        low, high = (tuple(float(pair[i]) for pair in bounds) for i in (0, 1))
    else:
        return relative
    if mode == "dataset":  # one dtype for every class: the widest bounds decide
        every = [record["bounds"], *(record.get("class_bounds") or {}).values()]
        lowest, highest = min(p[0] for b in every for p in b), max(p[1] for b in every for p in b)
    else:
        lowest, highest = min(low), max(high)
    fits = np.issubdtype(source, np.integer) and (
        np.iinfo(source).min <= lowest and highest <= np.iinfo(source).max
    )
    dtype = source.name if fits else "float32"
    if suffix in PNG_SUFFIXES and dtype not in PNG_DTYPES:
        return relative
    return IntensityMapping(dtype, low, high, physical=True)
