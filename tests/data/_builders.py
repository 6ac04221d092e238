"""Builders of small test files from real images, shared by the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfusion.data.image import ImageInfo, MedicalImage


def gray_crops(source: np.ndarray, count: int, size: int = 16, offset: int = 0) -> list[np.ndarray]:
    """``count`` distinct (1, size, size) crops along the diagonal of ``source``."""
    step = (source.shape[-1] - size) // max(count, 1)
    return [
        source[:, i * step + offset : i * step + offset + size, i * step : i * step + size]
        for i in range(count)
    ]


def write_ct_series(folder: Path, positions: list[float], series_uid: str | None = None) -> list[Path]:
    """Copies of pydicom's CT_small.dcm as slices of one series at the given z positions."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uid = series_uid or generate_uid()
    paths = []
    for i, z in enumerate(positions):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        path = folder / f"slice{i:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def assert_info_agrees(info: ImageInfo, image: MedicalImage, atol: float = 1e-6) -> None:
    """The header reader and the pixel reader describe the same image."""
    assert info.spatial_dims == image.spatial_dims
    assert info.shape == image.spatial_shape
    assert info.channels == image.channels
    assert info.dtype == image.array.dtype.name
    np.testing.assert_allclose(info.spacing, image.spacing, rtol=0, atol=atol)
