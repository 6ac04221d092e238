"""Fixtures of the training tests: Accelerate's global state reset, a tiny dataset of real crops."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from medfusion.data import write_image
from medfusion.data.image import MedicalImage
from tests.training._training_helpers import RetinaCrops


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each test builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def retina_crops() -> RetinaCrops:
    return RetinaCrops()


@pytest.fixture(scope="session")
def crops_2d(tmp_path_factory) -> Path:
    """16x16 grey crops of two real images (fundus, histology), 10 per class, 8-bit PNG."""
    from skimage import data

    root = tmp_path_factory.mktemp("crops2d")
    rng = np.random.default_rng(0)
    for name, image in (("fundus", data.retina()), ("histology", data.immunohistochemistry())):
        grey = image.mean(axis=2).astype(np.uint8)
        h, w = grey.shape
        for i in range(10):
            y, x = rng.integers(h // 4, 3 * h // 4 - 16), rng.integers(w // 4, 3 * w // 4 - 16)
            write_image(root / name / f"{i}.png", grey[None, y : y + 16, x : x + 16])
    return root


@pytest.fixture(scope="session")
def crops_3d(tmp_path_factory) -> Path:
    """16^3 crops of two of nibabel's test volumes (a T1 anatomy and an EPI series)."""
    root = tmp_path_factory.mktemp("crops3d")
    rng = np.random.default_rng(0)
    anat = np.asarray(nib.load(Path(data_path) / "anatomical.nii").dataobj, dtype=np.float32)
    epi = np.asarray(nib.load(Path(data_path) / "example4d.nii.gz").dataobj, dtype=np.float32)[..., 0]
    for name, volume in (("anatomical", anat), ("epi", epi)):
        for i in range(6):
            start = [rng.integers(0, s - 16 + 1) for s in volume.shape]
            crop = volume[tuple(slice(s, s + 16) for s in start)]
            image = MedicalImage.from_array(crop[None], spacing=(2.0, 2.0, 2.0))
            write_image(root / name / f"{i}.nii.gz", image)
    return root
