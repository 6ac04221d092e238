"""DICOM writer for synthetic 2D images and 3D volumes that must stand in for real ones.

A synthetic dataset written as DICOM should open in any viewer or PACS, read back through
:func:`medfusion.data.readers.read_image` (and SimpleITK/GDCM) exactly as it was generated, and
never be mistaken for a patient's images.

**SOP classes** (:func:`sop_class_for`). Modality ``CT`` is written as CT Image Storage and ``MR``
as MR Image Storage, both grey only (their IODs require 16-bit single-sample pixels, so 8-bit input
is stored in 16 bits). Everything else, and every RGB image whatever its modality, is Secondary
Capture Image Storage with the modality kept in Modality: the DX/CR/MG IODs require detector and
exposure attributes that a generated image does not have. The MR IOD has no Modality LUT, so MR
images are stored in their own units (``slope`` 1, ``intercept`` 0); CT and secondary capture
carry RescaleSlope/RescaleIntercept so that ``stored * slope + intercept`` are the source units
(Hounsfield units for CT). Every Type 1 and Type 2 attribute of the modules written is present:
Patient, General Study, General Series, General Equipment, General Image, Image Pixel, SOP Common,
and per class Frame of Reference + Image Plane + CT Image / MR Image, or SC Equipment (with the
Modality LUT for the rescale). Attributes a generator cannot know (birth date, sex, kVp, echo
time, ...) are present and empty, which is what Type 2 allows, rather than invented.

**What says the data is synthetic.** PatientName ``SYNTHETIC^<class>``, PatientID
``SYNTHETIC-<class>-<seed>``, StudyID ``SYNTHETIC``; ImageType ``DERIVED\\SECONDARY``;
BurnedInAnnotation and RecognizableVisualFeatures ``NO``; Manufacturer ``medfusion`` and
ManufacturerModelName the generator; secondary capture ConversionType ``SYN`` (synthetic image);
DerivationDescription and ImageComments in words; and a private block (group 0011, private
creator ``medfusion``) holding the generator, the class, the seed and the model's SHA-256
(:data:`PRIVATE_TAGS`). Text is UTF-8 (SpecificCharacterSet ``ISO_IR 192``); a class name is
cleaned of the PN/LO delimiters (``\\ ^ =``) and shortened to the value length DICOM allows.
Study, series and instance UIDs are new for every file or series unless
:class:`SyntheticDicomInfo` gives the study (or series) UID to share.

**Geometry** follows :mod:`medfusion.data.image` (SimpleITK's convention: spacing and origin in
physical ``(x, y, z)`` order, direction the row-major 3x3 matrix whose columns are the directions
of the array's x, y, z axes). PixelSpacing is ``row spacing \\ column spacing`` = ``(y, x)``;
ImageOrientationPatient is the direction's first two columns; slice ``k`` of a series lies at
ImagePositionPatient ``origin + k * spacing_z * third column``, with SliceThickness and
SpacingBetweenSlices ``spacing_z`` and SliceLocation the position along the third column. DICOM
readers order slices along ``row x column``, so the direction must be a proper rotation
(determinant +1): a left-handed direction would read back with its slices reversed and is
refused; :func:`right_handed` turns such a volume into the same voxels in a right-handed frame.
A single 2D file is placed at the origin with identity orientation (CT/MR) or without a position
(secondary capture); only its pixel spacing is kept.

Every file is written under a temporary name (a series in a temporary folder) and read back
through :func:`~medfusion.data.readers.read_image` before it is renamed: values in source units
and geometry must agree, or :func:`medfusion.utils.write_error` names the file.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from medfusion.utils import MAX_SEED, atomic_dir, atomic_path, full_suffix, write_error

# SOP classes (PS3.4 B.5)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SOP_CLASS_NAMES = {
    CT_IMAGE_STORAGE: "CT Image Storage",
    MR_IMAGE_STORAGE: "MR Image Storage",
    SECONDARY_CAPTURE_IMAGE_STORAGE: "Secondary Capture Image Storage",
}

DICOM_SUFFIX = ".dcm"
PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "medfusion"
# element offsets inside the private block -> what they hold (all LO)
PRIVATE_TAGS = {0x01: "generator", 0x02: "class_name", 0x03: "seed", 0x04: "model_sha256"}

_STORED_DTYPES = ("uint8", "uint16", "int16")
_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_LO_MAX = 64  # characters in an LO value and in one PN component
_ORTHONORMAL_TOLERANCE = 1e-4
_GEOMETRY_TOLERANCE = 1e-4


def sop_class_for(modality: str, channels: int = 1) -> str:
    """The SOP Class UID an image of ``modality`` with ``channels`` samples per pixel is written as.

    Args:
        modality: DICOM Modality, e.g. ``"CT"``, ``"MR"``, ``"DX"``, ``"OT"``.
        channels: 1 (grey) or 3 (RGB).

    Returns:
        CT Image Storage for grey CT, MR Image Storage for grey MR, else Secondary Capture Image
        Storage (see :data:`SOP_CLASS_NAMES`).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB) for DICOM; got {channels!r}")
    if not isinstance(modality, str) or not _MODALITY.match(modality):
        raise ValueError(
            f"modality must be a DICOM modality code (1-16 of A-Z, 0-9, _), e.g. 'CT'; got {modality!r}"
        )
    if channels == 1 and modality == "CT":
        return CT_IMAGE_STORAGE
    if channels == 1 and modality == "MR":
        return MR_IMAGE_STORAGE
    return SECONDARY_CAPTURE_IMAGE_STORAGE


@dataclass(frozen=True)
class SyntheticDicomInfo:
    """What the written files say about themselves.

    Attributes:
        class_name: the class the sample was generated for (in PatientName and PatientID).
        seed: the sample's random seed, 0 to ``2**64 - 1``.
        modality: DICOM Modality code; picks the SOP class (:func:`sop_class_for`).
        model_sha256: hex SHA-256 of the model that generated the sample, or empty.
        generator: what generated the sample (ManufacturerModelName), e.g. ``"medfusion"``.
        study_uid: StudyInstanceUID to share across files; a new one per file/series when None.
        series_uid: SeriesInstanceUID to share across 2D files (or to give a series); a new one
            per file/series when None.
        series_description: SeriesDescription; ``"SYNTHETIC <class>"`` when None.
        series_number: SeriesNumber.
    """

    class_name: str
    seed: int
    modality: str = "OT"
    model_sha256: str = ""
    generator: str = "medfusion"
    study_uid: str | None = None
    series_uid: str | None = None
    series_description: str | None = None
    series_number: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.class_name, str) or not self.class_name.strip():
            raise ValueError(f"class_name must be a non-empty string; got {self.class_name!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be a whole number from 0 to 2**64 - 1; got {self.seed!r}")
        sop_class_for(self.modality)  # checks the modality code
        if self.model_sha256 and not (
            isinstance(self.model_sha256, str) and _SHA256.match(self.model_sha256)
        ):
            raise ValueError(f"model_sha256 must be 64 hex digits or empty; got {self.model_sha256!r}")
        if not isinstance(self.generator, str) or not self.generator.strip():
            raise ValueError(f"generator must be a non-empty string; got {self.generator!r}")
        for name in ("study_uid", "series_uid"):
            _check_uid(name, getattr(self, name))
        if isinstance(self.series_number, bool) or not isinstance(self.series_number, int):
            raise ValueError(f"series_number must be a whole number; got {self.series_number!r}")
        if not 0 <= self.series_number < 2**31:
            raise ValueError(f"series_number must be from 0 to 2**31 - 1; got {self.series_number!r}")

    @property
    def patient_name(self) -> str:
        """PatientName: ``SYNTHETIC^<class>``."""
        return f"SYNTHETIC^{_clean(self.class_name, _LO_MAX - len('SYNTHETIC^'))}"  # 64 per group

    @property
    def patient_id(self) -> str:
        """PatientID: ``SYNTHETIC-<class>-<seed>`` (the class shortened to fit 64 characters)."""
        room = _LO_MAX - len(f"SYNTHETIC--{self.seed}")
        return f"SYNTHETIC-{_clean(self.class_name, room)}-{self.seed}"

    def describe(self) -> str:
        """One line saying the data is synthetic and how it was made (DerivationDescription)."""
        model = self.model_sha256.lower() or "unknown"
        generator = _clean(self.generator, _LO_MAX)
        by = generator if generator == "medfusion" else f"{generator} (medfusion)"
        return (
            f"SYNTHETIC image generated by {by}; "
            f"class {_clean(self.class_name, _LO_MAX)}; "
            f"seed {self.seed}; model sha256 {model}"
        )


def _check_uid(name: str, value: str | None) -> None:
    if value is not None and not (isinstance(value, str) and len(value) <= 64 and _UID.match(value)):
        raise ValueError(
            f"{name} must be a valid DICOM UID (digits and dots, <= 64 characters); got {value!r}"
        )


def _clean(text: str, limit: int) -> str:
    """``text`` without DICOM value/PN delimiters and control characters, at most ``limit`` long."""
    cleaned = "".join("_" if c in "\\^=" or not c.isprintable() else c for c in text.strip())
    return cleaned[: max(limit, 1)]


def right_handed(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    direction: tuple[float, ...],
) -> tuple[np.ndarray, tuple[float, ...], tuple[float, ...]]:
    """The same voxels in a right-handed frame, for a volume whose direction has determinant -1.

    The slice axis is reversed, the origin moved to the last slice and the third column negated;
    a right-handed direction is returned unchanged.

    Args:
        volume: array of shape ``(C, D, H, W)``.
        spacing: ``(x, y, z)`` voxel size.
        origin: ``(x, y, z)`` position of the first voxel.
        direction: 9 floats, row-major 3x3.

    Returns:
        ``(volume, origin, direction)`` to write with the same ``spacing``.
    """
    matrix = _direction_matrix(direction)
    if np.linalg.det(matrix) > 0:
        return volume, tuple(float(v) for v in origin), tuple(float(v) for v in matrix.ravel())
    depth = np.asarray(volume).shape[1]
    last = np.asarray(origin, dtype=float) + (depth - 1) * float(spacing[2]) * matrix[:, 2]
    flipped = matrix.copy()
    flipped[:, 2] *= -1
    return (
        np.ascontiguousarray(np.asarray(volume)[:, ::-1]),
        tuple(float(v) for v in last),
        tuple(float(v) for v in flipped.ravel()),
    )


# --------------------------------------------------------------------------------------------
# Argument checks


def _check_pixels(name: str, array, spatial_dims: int) -> np.ndarray:
    array = np.asarray(array)
    layout = "(C, H, W)" if spatial_dims == 2 else "(1, D, H, W)"
    if array.ndim != spatial_dims + 1:
        raise ValueError(f"{name} must have shape {layout}; got {array.shape}")
    if any(s == 0 for s in array.shape):
        raise ValueError(f"{name} must not be empty; got shape {array.shape}")
    if array.dtype.name not in _STORED_DTYPES:
        hint = (
            " (convert floats with medfusion.data.writers.intensity_mapping)"
            if array.dtype.kind == "f"
            else ""
        )
        raise ValueError(
            f"{name} must hold stored integer values as {', '.join(_STORED_DTYPES)}; got {array.dtype}{hint}"
        )
    channels = array.shape[0]
    if spatial_dims == 3 and channels != 1:
        raise ValueError(f"{name} must have one channel for a DICOM series; got {channels} channels")
    if channels not in (1, 3):
        raise ValueError(f"{name} must have 1 (grey) or 3 (RGB) channels for DICOM; got {channels}")
    if channels == 3 and array.dtype != np.uint8:
        raise ValueError(f"{name} with 3 channels (RGB) must be uint8; got {array.dtype}")
    return array


def _check_floats(name: str, values, count: int, positive: bool = False) -> tuple[float, ...]:
    try:
        floats = tuple(float(v) for v in values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be {count} numbers; got {values!r}") from e
    if len(floats) != count or not all(math.isfinite(v) for v in floats):
        raise ValueError(f"{name} must be {count} finite numbers; got {values!r}")
    if positive and not all(v > 0 for v in floats):
        raise ValueError(f"{name} must be > 0 on every axis; got {floats}")
    return floats


def _check_rescale(slope: float, intercept: float, sop_class: str) -> tuple[float, float]:
    slope = _check_floats("slope", (slope,), 1)[0]
    intercept = _check_floats("intercept", (intercept,), 1)[0]
    if slope == 0:
        raise ValueError("slope must not be 0 (stored * slope + intercept are the source values)")
    if sop_class == MR_IMAGE_STORAGE and (slope, intercept) != (1.0, 0.0):
        raise ValueError(
            f"slope and intercept must be 1 and 0 for MR (the MR IOD has no rescale); got {slope:g} and "
            f"{intercept:g}: store the values in their own units, or use modality 'OT'"
        )
    return slope, intercept


def _direction_matrix(direction) -> np.ndarray:
    matrix = np.asarray(_check_floats("direction", direction, 9), dtype=float).reshape(3, 3)
    error = np.abs(matrix.T @ matrix - np.eye(3)).max()
    if error > _ORTHONORMAL_TOLERANCE:
        raise ValueError(
            f"direction must be an orthonormal 3x3 matrix (row-major, columns of unit length at right "
            f"angles); got {_floats(matrix)}, off by {error:.3g}"
        )
    return matrix


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in np.ravel(values))


def _check_target(name: str, path: Path, suffix: bool) -> None:
    if suffix and full_suffix(path) != DICOM_SUFFIX:
        raise ValueError(f"{name} must end in {DICOM_SUFFIX}; got {str(path)!r}")
    if path.exists() or path.is_symlink():
        if not suffix:
            raise FileExistsError(
                f"{name} {str(path)!r} already exists; a DICOM series is written to a new folder"
            )
        if path.is_dir():
            raise IsADirectoryError(f"{name} {str(path)!r} is a folder, not a file")


# --------------------------------------------------------------------------------------------
# Building the dataset


def _ds(value: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def _now() -> tuple[str, str]:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _series_uids(info: SyntheticDicomInfo, series_uid: str | None) -> dict[str, str]:
    from pydicom.uid import generate_uid

    series = series_uid or generate_uid()
    # one frame of reference per series: derived from a shared series UID, so that 2D files of
    # one series written apart still share it
    frame = generate_uid(entropy_srcs=[series, "frame-of-reference"]) if series_uid else generate_uid()
    return {"study": info.study_uid or generate_uid(), "series": series, "frame": frame}


def _dataset(info: SyntheticDicomInfo, sop_class: str, uids: dict[str, str], when: tuple[str, str]):
    """A dataset with every attribute but the per-image ones (pixels, position, numbers)."""
    from pydicom.dataset import Dataset

    from medfusion import __version__

    date, time = when
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.TimezoneOffsetFromUTC = "+0000"
    ds.ImageType = ["DERIVED", "SECONDARY", *_image_type_value3(sop_class)]
    # Patient
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    # General Study
    ds.StudyInstanceUID = uids["study"]
    ds.StudyDate, ds.StudyTime = date, time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "SYNTHETIC"
    ds.AccessionNumber = ""
    ds.StudyDescription = "SYNTHETIC (medfusion)"
    # General Series
    ds.Modality = info.modality
    ds.SeriesInstanceUID = uids["series"]
    ds.SeriesNumber = info.series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    description = info.series_description or f"SYNTHETIC {info.class_name}"
    ds.SeriesDescription = _clean(description, _LO_MAX)
    # General Equipment
    ds.Manufacturer = "medfusion"
    ds.ManufacturerModelName = _clean(info.generator, _LO_MAX)
    ds.SoftwareVersions = f"medfusion {__version__}"
    # General Image
    ds.ContentDate, ds.ContentTime = date, time
    ds.DerivationDescription = info.describe()
    ds.ImageComments = "SYNTHETIC: generated by a model, not acquired from a patient. " + info.describe()
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    if sop_class == SECONDARY_CAPTURE_IMAGE_STORAGE:
        ds.PatientOrientation = ""  # Type 2C: no Image Plane module in secondary capture
        ds.ConversionType = "SYN"  # SC Equipment: synthetic image
        ds.SecondaryCaptureDeviceManufacturer = "medfusion"
        ds.SecondaryCaptureDeviceManufacturerModelName = ds.ManufacturerModelName
        ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = date, time
    else:
        ds.FrameOfReferenceUID = uids["frame"]
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = ""  # Type 2C for CT and MR
    if sop_class == CT_IMAGE_STORAGE:
        ds.KVP = ""
        ds.AcquisitionNumber = ""
    elif sop_class == MR_IMAGE_STORAGE:
        ds.ScanningSequence = "RM"  # research mode: no real sequence
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = ""
        ds.RepetitionTime = ""
        ds.EchoTime = ""
        ds.EchoTrainLength = ""
        ds.AcquisitionNumber = ""
    _private_block(ds, info)
    return ds


def _image_type_value3(sop_class: str) -> list[str]:
    if sop_class == CT_IMAGE_STORAGE:
        return ["AXIAL"]  # a cross-sectional image, not a localizer
    if sop_class == MR_IMAGE_STORAGE:
        return ["OTHER"]
    return []


def _private_block(ds, info: SyntheticDicomInfo) -> None:
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    values = {
        "generator": _clean(info.generator, _LO_MAX),
        "class_name": _clean(info.class_name, _LO_MAX),
        "seed": str(info.seed),
        "model_sha256": info.model_sha256.lower(),
    }
    for offset, name in PRIVATE_TAGS.items():
        block.add_new(offset, "LO", values[name])


def _set_pixels(ds, plane: np.ndarray, sop_class: str, slope: float, intercept: float) -> None:
    """Image Pixel (and Modality LUT) attributes for ``plane`` of shape (C, H, W)."""
    channels, rows, columns = plane.shape
    if sop_class != SECONDARY_CAPTURE_IMAGE_STORAGE and plane.dtype == np.uint8:
        plane = plane.astype(np.uint16)  # CT and MR images are 16 bits allocated
    bits = plane.dtype.itemsize * 8
    ds.SamplesPerPixel = channels
    ds.PhotometricInterpretation = "RGB" if channels == 3 else "MONOCHROME2"
    if channels == 3:
        ds.PlanarConfiguration = 0  # R1 G1 B1 R2 G2 B2 ...
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if plane.dtype.kind == "i" else 0
    if channels == 1 and sop_class != MR_IMAGE_STORAGE:
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(slope)
        ds.RescaleType = "HU" if ds.Modality == "CT" else "US"
    data = np.ascontiguousarray(np.moveaxis(plane, 0, -1)).astype(plane.dtype.newbyteorder("<")).tobytes()
    ds.add_new(0x7FE00010, "OB" if bits == 8 else "OW", data + b"\0" * (len(data) % 2))


def _set_plane(ds, spacing_xy, position, row_col) -> None:
    ds.PixelSpacing = [_ds(spacing_xy[1]), _ds(spacing_xy[0])]  # row spacing \ column spacing
    if position is not None:
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in row_col]


def _save(ds, path: Path) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = "MEDFUSION"
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)


def _source_units(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """What a reader should return: ``stored * slope + intercept`` with the values as written."""
    return stored.astype(np.float64) * float(_ds(slope)) + float(_ds(intercept))


# --------------------------------------------------------------------------------------------
# Writers


def write_dicom_image(
    path: str | os.PathLike,
    array,
    info: SyntheticDicomInfo,
    spacing: tuple[float, float] = (1.0, 1.0),
    slope: float = 1.0,
    intercept: float = 0.0,
    instance_number: int = 1,
) -> Path:
    """Write one synthetic 2D image as a single-frame DICOM file, atomically, and verify it.

    Args:
        path: target file, ending in ``.dcm``.
        array: stored values of shape ``(C, H, W)``: ``uint8``, ``uint16`` or ``int16`` with C = 1
            (MONOCHROME2), or ``uint8`` with C = 3 (RGB).
        info: what the file says about itself (class, seed, modality, model hash, UIDs).
        spacing: pixel size ``(x, y)`` in mm.
        slope: RescaleSlope; ``array * slope + intercept`` are the source units (grey only).
        intercept: RescaleIntercept, e.g. -1024 for CT stored as unsigned Hounsfield units + 1024.
        instance_number: InstanceNumber, e.g. the sample's index.

    Returns:
        The written path.
    """
    from pydicom.uid import generate_uid

    path = Path(path)
    _check_target("path", path, suffix=True)
    if not isinstance(info, SyntheticDicomInfo):
        raise TypeError(f"info must be a SyntheticDicomInfo; got {type(info).__name__}")
    array = _check_pixels("array", array, 2)
    sop_class = sop_class_for(info.modality, array.shape[0])
    spacing = _check_floats("spacing", spacing, 2, positive=True)
    if array.shape[0] == 3 and (slope, intercept) != (1.0, 0.0):
        raise ValueError(
            f"slope and intercept apply to grey images only; got {slope!r} and {intercept!r} for RGB"
        )
    slope, intercept = _check_rescale(slope, intercept, sop_class)
    if isinstance(instance_number, bool) or not isinstance(instance_number, int) or instance_number < 0:
        raise ValueError(f"instance_number must be a whole number >= 0; got {instance_number!r}")

    ds = _dataset(info, sop_class, _series_uids(info, info.series_uid), _now())
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = instance_number
    _set_pixels(ds, array, sop_class, slope, intercept)
    if sop_class == SECONDARY_CAPTURE_IMAGE_STORAGE:
        _set_plane(ds, spacing, None, None)
    else:
        _set_plane(ds, spacing, (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
        ds.SliceThickness = ""
    expected = array if array.shape[0] == 3 else _source_units(array, slope, intercept)
    with atomic_path(path) as tmp:
        _save(ds, tmp)
        _verify(tmp, path, expected, slope, spacing)
    return path


def write_dicom_series(
    folder: str | os.PathLike,
    volume,
    info: SyntheticDicomInfo,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    slope: float = 1.0,
    intercept: float = 0.0,
) -> Path:
    """Write one synthetic volume as a DICOM series, one file per slice, in a new folder.

    The slices (``000.dcm``, ``001.dcm``, ...) share StudyInstanceUID, SeriesInstanceUID and
    FrameOfReferenceUID. The folder is built under a temporary name, read back and renamed, so
    an interrupted run never leaves a partial series under ``folder``.

    Args:
        folder: the series folder to create; it must not exist.
        volume: stored values of shape ``(1, D, H, W)``: ``uint8``, ``uint16`` or ``int16``.
        info: what the files say about themselves (class, seed, modality, model hash, study UID).
        spacing: voxel size ``(x, y, z)`` in mm; z is the slice spacing.
        origin: position ``(x, y, z)`` of the first voxel of the first slice, in mm (LPS).
        direction: row-major 3x3 direction matrix (9 floats), orthonormal, determinant +1
            (see :func:`right_handed`).
        slope: RescaleSlope; ``volume * slope + intercept`` are the source units.
        intercept: RescaleIntercept, e.g. -1024 for CT stored as unsigned Hounsfield units + 1024.

    Returns:
        The folder written.
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    _check_target("folder", folder, suffix=False)
    if not isinstance(info, SyntheticDicomInfo):
        raise TypeError(f"info must be a SyntheticDicomInfo; got {type(info).__name__}")
    volume = _check_pixels("volume", volume, 3)
    sop_class = sop_class_for(info.modality, 1)
    spacing = _check_floats("spacing", spacing, 3, positive=True)
    origin = _check_floats("origin", origin, 3)
    matrix = _direction_matrix(direction)
    if np.linalg.det(matrix) < 0:
        raise ValueError(
            "direction must be right-handed (determinant +1): DICOM readers order slices along "
            "row x column and would reverse a left-handed volume; convert it with "
            f"medfusion.data.dicom.right_handed first; got {_floats(matrix)}"
        )
    slope, intercept = _check_rescale(slope, intercept, sop_class)

    depth = volume.shape[1]
    width = max(3, len(str(depth - 1)))
    template = _dataset(info, sop_class, _series_uids(info, info.series_uid), _now())
    row_col = (*matrix[:, 0], *matrix[:, 1])
    normal = matrix[:, 2]
    with atomic_dir(folder) as tmp:
        for k in range(depth):
            ds = copy.deepcopy(template)  # Dataset.copy() shares its elements
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            position = np.asarray(origin) + k * spacing[2] * normal
            _set_plane(ds, spacing[:2], position, row_col)
            ds.SliceThickness = ds.SpacingBetweenSlices = _ds(spacing[2])
            ds.SliceLocation = _ds(float(position @ normal))
            _set_pixels(ds, volume[:, k], sop_class, slope, intercept)
            _save(ds, tmp / f"{k:0{width}d}{DICOM_SUFFIX}")
        _verify(tmp, folder, _source_units(volume, slope, intercept), slope, spacing, origin, matrix)
    return folder


# --------------------------------------------------------------------------------------------
# Reading back


def _verify(
    tmp: Path,
    path: Path,
    expected: np.ndarray,
    slope: float,
    spacing: tuple[float, ...],
    origin: tuple[float, ...] | None = None,
    direction: np.ndarray | None = None,
) -> None:
    """Read ``tmp`` back through medfusion's reader; raise naming ``path`` when it differs."""
    from medfusion.data.errors import ImageReadError
    from medfusion.data.readers import read_image

    try:
        back = read_image(tmp, check_finite=False)
    except ImageReadError as e:
        raise write_error(path, f"the DICOM data does not read back ({e.reason})") from e
    values = np.asarray(back.array)
    if values.shape != expected.shape:
        raise write_error(path, f"reads back with shape {list(values.shape)}, not {list(expected.shape)}")
    # a wrong stored value is off by at least |slope|; less is the reader's float rounding
    if not np.allclose(values.astype(np.float64), expected, rtol=1e-6, atol=abs(slope) / 4):
        raise write_error(path, "reads back with other values")
    found = {"spacing": back.spacing}
    meant = {"spacing": spacing}
    if origin is not None:
        found.update(origin=back.origin, direction=back.direction)
        meant.update(origin=origin, direction=tuple(direction.ravel()))
    for name, value in meant.items():
        if not np.allclose(found[name], value, rtol=1e-6, atol=_GEOMETRY_TOLERANCE):
            raise write_error(path, f"reads back with {name} {tuple(found[name])}, not {tuple(value)}")
