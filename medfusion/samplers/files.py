"""How the samples of a synthetic dataset are stored: the file format, the intensity mapping back to
the training data's units, the training geometry, and for DICOM what each file says about itself.

Formats (:data:`FILE_FORMATS`): ``auto`` writes like the training data (PNG of its bit depth for
images, TIFF where PNG cannot hold the values, e.g. signed CT in Hounsfield units, NIfTI for
volumes); ``png``, ``tif``, ``nifti`` name one; ``dicom`` writes 2D samples as single-frame files
(``<class>/000000.dcm``) and volumes as one series folder per sample (``<class>/000000/``), with
the modality of the training data and rescale slope/intercept that give its units back
(:mod:`medfusion.data.dicom`). DICOM UIDs are derived from the model's hash and the first seed,
so a resumed run continues the same study and series.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from medfusion.data.image import MedicalImage
from medfusion.data.writers import (
    PNG_DTYPES,
    IntensityMapping,
    intensity_mapping,
    write_image,
    written_file_problem,
)
from medfusion.samplers.model_folder import ModelInfo

FILE_FORMATS = {"png": ".png", "tif": ".tif", "nifti": ".nii.gz", "dicom": ".dcm"}
SERIES = ""  # the suffix of a DICOM series: a folder per sample
_DICOM_STORED = ("uint8", "uint16", "int16")  # what the DICOM writer stores as it is


def output_suffix(info: ModelInfo) -> str:
    """``.nii.gz`` for volumes; for images ``.png`` when PNG holds them (1, 3 or 4 channels of the
    unsigned 8/16-bit values that :func:`~medfusion.data.writers.intensity_mapping` stores, like the
    source's bit depth), else ``.tif`` (other channel counts, signed or float values in the
    training data's units, e.g. 2D CT in Hounsfield units)."""
    if info.spatial_dims == 3:
        return ".nii.gz"
    stored = intensity_mapping(".tif", info.source_dtype, info.normalization).dtype
    return ".png" if info.channels in (1, 3, 4) and stored in PNG_DTYPES else ".tif"


def format_suffix(info: ModelInfo, file_format: str = "auto") -> str:
    """The suffix of the samples of ``file_format`` (``auto``: :func:`output_suffix`; a DICOM
    series: :data:`SERIES`); refuses a format that cannot hold the model's images."""
    if file_format == "auto":
        return output_suffix(info)
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format must be 'auto' or one of {list(FILE_FORMATS)}; got {file_format!r}")
    if file_format in ("png", "tif") and info.spatial_dims == 3:
        raise ValueError(f"file_format {file_format!r} holds 2D images; the model makes volumes")
    if file_format == "png" and info.channels not in (1, 3, 4):
        raise ValueError(f"file_format 'png' holds 1, 3 or 4 channels; the model makes {info.channels}")
    if file_format == "dicom" and info.channels not in (1, 3):
        raise ValueError(f"file_format 'dicom' holds 1 or 3 channels; the model makes {info.channels}")
    if file_format == "dicom" and info.spatial_dims == 3:
        if info.channels != 1:
            raise ValueError("file_format 'dicom' holds volumes of 1 channel")
        return SERIES
    return FILE_FORMATS[file_format]


class SampleFiles:
    """Writing, checking and removing the files of one synthetic dataset.

    Args:
        info: the model's record (normalisation, source dtype, geometry, training data).
        suffix: from :func:`format_suffix`.
        digest: the model's SHA-256 (DICOM files name it; their UIDs derive from it).
        seed: the dataset's first seed (for the DICOM UIDs).
        generator: names the generator in DICOM files.
    """

    def __init__(self, info: ModelInfo, suffix: str, digest: str = "", seed: int = 0, generator: str = ""):
        self.info, self.suffix, self.digest, self.seed = info, suffix, digest, int(seed)
        self.generator = generator or "medfusion"
        self.dicom = suffix in (SERIES, ".dcm")
        # DICOM: the units first (as for volumes), then how they are stored (see _dicom_storage)
        units_of = ".nii.gz" if self.dicom else suffix
        self.mapping = intensity_mapping(units_of, info.source_dtype, info.normalization)
        if self.dicom and info.channels == 3 and self.mapping.dtype != "uint8":
            self.mapping = IntensityMapping("uint8", 0.0, 255.0, physical=False)  # DICOM RGB is 8-bit
        classes = (info.normalization.get("class_bounds") or {}) if self.mapping.physical else {}
        self.class_mappings = {  # classes fitted on their own: their own bounds
            label: intensity_mapping(units_of, info.source_dtype, info.normalization, label)
            for label in classes
        }
        self.modality = str(info.training_data.get("modality") or "") or "OT"

    def mapping_for(self, label: str) -> IntensityMapping:
        """The mapping of the images of class ``label`` (its own fitted bounds, if any)."""
        return self.class_mappings.get(label, self.mapping)

    def describe(self) -> str:
        what = "a DICOM series per sample" if self.suffix == SERIES else self.suffix
        text = f"{what}: {self.mapping.describe()}"
        if self.class_mappings:
            text += "; per class: " + "; ".join(
                f"{c} {m.describe()}" for c, m in sorted(self.class_mappings.items())
            )
        mode = self.info.normalization.get("normalization", "auto")
        if not self.mapping.physical and mode in ("auto", "percentile", "minmax"):
            text += (
                f"; the model normalised each training image on its own ({mode}), so its images have "
                "no units: train with normalization auto or dataset for the training data's units"
            )
        return text

    def present(self, path: Path) -> bool:
        """Whether a sample is at ``path`` (a file; a folder for a DICOM series)."""
        return path.is_dir() if self.suffix == SERIES else path.is_file()

    def problem(self, path: Path) -> str | None:
        """What is wrong with a sample an earlier (perhaps killed) run left at ``path``, or None."""
        shape = (self.info.channels, *self.info.image_size)
        if not self.dicom:
            return written_file_problem(path, shape, self.mapping.dtype)
        from medfusion.data.errors import DataError
        from medfusion.data.readers import read_image

        if self.suffix == SERIES and not path.is_dir():
            return "not a folder"
        try:
            image = read_image(path)
        except (DataError, OSError) as e:
            return str(e)
        found = tuple(np.asarray(image.array).shape)
        return None if found == shape else f"holds an image of shape {list(found)}, expected {list(shape)}"

    def remove(self, path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            if self.suffix != SERIES:
                raise ValueError(f"{path}: a folder stands where a sample file goes; remove it")
            shutil.rmtree(path)
        else:
            path.unlink()

    def write(self, path: Path, image: np.ndarray, label: str, seed: int, index: int) -> None:
        """Write the generated ``image`` (C, *spatial) in [-1, 1] of class ``label`` to ``path``."""
        mapping = self.mapping_for(label)
        values = mapping(image)
        info = self.info
        if not self.dicom:
            write_image(path, MedicalImage.from_array(values, spacing=info.spacing, direction=info.direction))
            return
        from medfusion.data.dicom import right_handed, write_dicom_image, write_dicom_series

        stored, slope, intercept = _dicom_storage(values, mapping)
        dicom_info = self._dicom_info(label, seed, index, slope, intercept)
        spacing = info.spacing or (1.0,) * info.spatial_dims
        if self.suffix == SERIES:
            direction = info.direction or tuple(np.eye(3).ravel())
            stored, origin, direction = right_handed(stored, spacing, (0.0, 0.0, 0.0), direction)
            write_dicom_series(path, stored, dicom_info, spacing, origin, direction, slope, intercept)
        else:
            write_dicom_image(path, stored, dicom_info, spacing, slope, intercept, instance_number=index + 1)

    def _dicom_info(self, label: str, seed: int, index: int, slope: float, intercept: float):
        from pydicom.uid import generate_uid

        from medfusion.data.dicom import SyntheticDicomInfo

        modality = self.modality
        if modality == "MR" and (slope, intercept) != (1.0, 0.0):
            modality = "OT"  # the MR IOD has no rescale: values that need one go as secondary capture
        key = [self.digest, str(self.seed)]
        series = [*key, str(index)]  # a series per sample: 2D files of one series would read as a volume
        return SyntheticDicomInfo(
            class_name=label,
            seed=seed,
            modality=modality,
            model_sha256=self.digest,
            generator=self.generator,
            study_uid=generate_uid(entropy_srcs=[*key, "study"]),
            series_uid=generate_uid(entropy_srcs=[*series, "series"]),
            series_description=f"synthetic {self.modality} {label}"[:64],
        )


def _dicom_storage(values: np.ndarray, mapping: IntensityMapping) -> tuple[np.ndarray, float, float]:
    """Values in the mapping's type -> (stored integers, slope, intercept) for DICOM: 8/16-bit
    integers as they are; anything else (float units) as uint16 over the mapping's range with the
    rescale that gives the units back (to 1/65535 of the range)."""
    if mapping.dtype in _DICOM_STORED:
        return values, 1.0, 0.0
    low, high = min(mapping.low), max(mapping.high)
    slope = (high - low) / 65535.0 if high > low else 1.0
    stored = np.rint((np.asarray(values, np.float64) - low) / slope)
    return np.clip(stored, 0, 65535).astype(np.uint16), slope, low
