"""Fixtures that build small dataset folders from real images (pydicom-data, scikit-image)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfusion.data import MedicalImage, write_image
from tests.data._builders import gray_crops


@pytest.fixture(scope="session")
def real_gray_16bit() -> np.ndarray:
    """A 16-bit (1, 128, 128) CT slice from pydicom's test data, shifted to be non-negative."""
    pydicom_data = pytest.importorskip("pydicom.data")
    from medfusion.data import read_image

    array = read_image(pydicom_data.get_testdata_file("CT_small.dcm")).array.astype(np.int64)
    return (array - array.min()).astype(np.uint16)


@pytest.fixture(scope="session")
def real_rgb() -> np.ndarray:
    """A (3, 128, 128) uint8 crop of scikit-image's immunohistochemistry image."""
    skdata = pytest.importorskip("skimage.data")
    return np.moveaxis(skdata.immunohistochemistry()[:128, :128], -1, 0).copy()


@pytest.fixture
def make_folder(tmp_path: Path, real_gray_16bit: np.ndarray):
    """Build ``{class: count}`` folders of 16x16 16-bit PNG crops; returns the folder."""

    def make(classes: dict[str, int] | int, root: Path | None = None) -> Path:
        root = root or tmp_path / "data"
        if isinstance(classes, int):  # unlabelled: files at the top level
            for i, crop in enumerate(gray_crops(real_gray_16bit, classes)):
                write_image(root / f"img{i:03d}.png", crop)
            return root
        for k, (name, count) in enumerate(classes.items()):
            for i, crop in enumerate(gray_crops(real_gray_16bit, count, offset=k)):
                write_image(root / name / f"{name}{i:03d}.png", crop)
        return root

    return make


@pytest.fixture
def make_volumes(tmp_path: Path):
    """Write ``count`` small real-valued 3D volumes (1, 8, 10, 12) as NIfTI into ``folder``."""

    def make(folder: Path, count: int, channels: int = 1) -> list[Path]:
        rng = np.random.default_rng(0)
        paths = []
        for i in range(count):
            array = rng.normal(size=(channels, 8, 10, 12)).astype(np.float32)
            image = MedicalImage.from_array(array, spacing=(1.0, 1.5, 2.0))
            paths.append(write_image(folder / f"vol{i:02d}.nii.gz", image))
        return paths

    return make
