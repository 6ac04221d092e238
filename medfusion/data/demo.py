"""Small class-conditional demo datasets cut from real medical images that ship in PyPI packages.

Nothing is downloaded at run time: the sources are files inside installed packages (the ``demo``
extra: ``pip install "medfusion[demo]"``):

========== ============ ======================================================= ==================
dataset    class        source                                                  package
========== ============ ======================================================= ==================
xray       chest        ``RG1_UNCI.dcm``: chest radiograph (CR, MONOCHROME1)    pydicom-data
xray       limb         ``RG3_UNCI.dcm``: tibia radiograph (CR, MONOCHROME1)    pydicom-data
xray       ct           ``693_UNCI.dcm``: CT slice                              pydicom-data
xray       mr           ``MR2_UNCI.dcm``: shoulder MR slice                     pydicom-data
color      fundus       ``skimage.data.retina()``: fundus photograph            scikit-image
color      histology    ``skimage.data.immunohistochemistry()``: colon IHC      scikit-image
========== ============ ======================================================= ==================

Each source is resampled to a common scale and cut into random square crops (64x64 by default)
that hold tissue, split into ``train/`` and ``heldout/``, and written as PNG (16-bit grayscale for
``xray``, 8-bit RGB for ``color``) in the ``DATA/<class>/`` layout the readers take.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medfusion import __version__
from medfusion.data.image import MedicalImage
from medfusion.data.readers import read_image
from medfusion.data.transforms import NormalizeIntensity, Resize
from medfusion.data.writers import to_unsigned, write_image
from medfusion.utils import atomic_dir

DEMO_FORMAT_VERSION = 1


@dataclass(frozen=True)
class DemoSource:
    """One class of a demo dataset: where its image comes from and how it is scaled."""

    dataset: str
    label: str
    description: str
    package: str
    licence: str
    load: Callable[[], MedicalImage]
    downscale: int
    bit_depth: int


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise RuntimeError(
            f"the demo data needs the package {package!r}, which is not installed; "
            'install the demo extra: pip install "medfusion[demo]"'
        )


def _dicom_source(name: str) -> Callable[[], MedicalImage]:
    def load() -> MedicalImage:
        _require("data_store", "pydicom-data")  # else pydicom would try to download the file
        from pydicom.data import get_testdata_file

        path = get_testdata_file(name)
        if path is None:
            raise RuntimeError(f"{name} is missing from the installed pydicom-data package")
        return read_image(path)

    return load


def _skimage_source(name: str) -> Callable[[], MedicalImage]:
    def load() -> MedicalImage:
        _require("skimage", "scikit-image")
        from skimage import data

        rgb = getattr(data, name)()  # (H, W, 3) uint8, shipped inside the package
        return MedicalImage.from_array(np.moveaxis(rgb, -1, 0).copy(), path=f"skimage.data.{name}")

    return load


_CC0 = "CC0 1.0 (Häggström 2014, Wikimedia Commons)"
_CMMI = "no known copyright restrictions (CMMI)"
_PYDICOM_LICENCE = "MIT (pydicom-data package); DICOM test images published for interoperability testing"
SOURCES = (
    DemoSource("xray", "chest", "RG1_UNCI.dcm, chest CR radiograph", "pydicom-data", _PYDICOM_LICENCE,
               _dicom_source("RG1_UNCI.dcm"), 4, 16),
    DemoSource("xray", "limb", "RG3_UNCI.dcm, tibia CR radiograph", "pydicom-data", _PYDICOM_LICENCE,
               _dicom_source("RG3_UNCI.dcm"), 4, 16),
    DemoSource("xray", "ct", "693_UNCI.dcm, CT slice", "pydicom-data", _PYDICOM_LICENCE,
               _dicom_source("693_UNCI.dcm"), 1, 16),
    DemoSource("xray", "mr", "MR2_UNCI.dcm, shoulder MR slice", "pydicom-data", _PYDICOM_LICENCE,
               _dicom_source("MR2_UNCI.dcm"), 2, 16),
    DemoSource("color", "fundus", "skimage.data.retina(), fundus photograph of a normal left eye",
               "scikit-image", _CC0, _skimage_source("retina"), 3, 8),
    DemoSource("color", "histology", "skimage.data.immunohistochemistry(), colonic glands, IHC (FHL2/DAB)",
               "scikit-image", _CMMI, _skimage_source("immunohistochemistry"), 1, 8),
)  # fmt: skip


def default_demo_dir() -> Path:
    """``$MEDFUSION_CACHE/demo-data``, else ``$XDG_CACHE_HOME/medfusion/demo-data``, else ``~/.cache/...``."""
    if os.environ.get("MEDFUSION_CACHE"):
        return Path(os.environ["MEDFUSION_CACHE"]) / "demo-data"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "medfusion" / "demo-data"


def _crops(
    image: np.ndarray, size: int, count: int, rng: np.random.Generator, min_std: float
) -> list[np.ndarray]:
    """``count`` random ``size``x``size`` crops of a (C, H, W) float image in [-1, 1] holding tissue.

    A crop holds tissue when its mean is above the background level and its standard deviation
    above ``min_std``; up to 50 tries per crop, then the best seen is taken.
    """
    _, height, width = image.shape
    if height < size or width < size:
        raise ValueError(f"source image {height}x{width} is smaller than the crop size {size}")
    background = float(np.percentile(image.mean(axis=0), 20))
    crops = []
    for _ in range(count):
        best, best_score = None, -np.inf
        for _ in range(50):
            y = int(rng.integers(0, height - size + 1))
            x = int(rng.integers(0, width - size + 1))
            crop = image[:, y : y + size, x : x + size]
            score = float(crop.std())
            if crop.mean() > background and score > min_std:
                best = crop
                break
            if score > best_score:
                best, best_score = crop, score
        crops.append(best)
    return crops


def build_demo_data(
    out: str | os.PathLike | None = None,
    crop_size: int = 64,
    per_class: int = 80,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write the demo datasets to ``out`` (once; later calls reuse a complete folder).

    Args:
        out: target folder; default :func:`default_demo_dir`.
        crop_size: side of the square crops, in pixels.
        per_class: crops per class (train + held-out).
        heldout_fraction: share of each class written to ``heldout/``.
        seed: seed of the crop positions.
        force: rebuild even when a complete folder with the same settings exists.
        progress: show a progress bar.

    Returns:
        The folder, holding ``<dataset>/{train,heldout}/<class>/*.png``, ``DATA_SOURCES.md`` and
        ``demo.json``.
    """
    if crop_size < 8:
        raise ValueError(f"crop_size must be at least 8; got {crop_size}")
    if per_class < 2:
        raise ValueError(f"per_class must be at least 2 (train and held-out); got {per_class}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1); got {heldout_fraction}")
    out = Path(out) if out is not None else default_demo_dir()
    settings = {
        "format": DEMO_FORMAT_VERSION,
        "crop_size": crop_size,
        "per_class": per_class,
        "heldout_fraction": heldout_fraction,
        "seed": seed,
    }
    marker = out / "demo.json"
    if marker.is_file() and not force:
        try:
            if json.loads(marker.read_text())["settings"] == settings:
                return out
        except (ValueError, KeyError):
            pass  # unreadable marker: rebuild
    if out.exists() and not marker.is_file() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not a medfusion demo folder; choose another --out")
    n_heldout = max(1, round(per_class * heldout_fraction))
    counts: dict[str, dict[str, int]] = {}
    with atomic_dir(out, overwrite=True) as tmp:
        for source in tqdm(SOURCES, desc="demo data", unit="class", disable=not progress):
            rng = np.random.default_rng([seed, SOURCES.index(source)])
            image = source.load()
            image = NormalizeIntensity("percentile", percentiles=(0.5, 99.5))(image, rng)
            if source.downscale > 1:
                size = tuple(s // source.downscale for s in image.spatial_shape)
                image = Resize(size, mode="area")(image, rng)
            crops = _crops(image.array.numpy(), crop_size, per_class, rng, min_std=0.05)
            for i, crop in enumerate(crops):
                split = "heldout" if i < n_heldout else "train"
                name = f"{source.label}_{i:04d}.png"
                write_image(
                    tmp / source.dataset / split / source.label / name, to_unsigned(crop, source.bit_depth)
                )
            counts.setdefault(source.dataset, {})[source.label] = per_class
        (tmp / "DATA_SOURCES.md").write_text(_sources_markdown(crop_size), encoding="utf-8")
        (tmp / "demo.json").write_text(
            json.dumps({"medfusion": __version__, "settings": settings, "counts": counts}, indent=2),
            encoding="utf-8",
        )
    return out


def _sources_markdown(crop_size: int) -> str:
    lines = [
        "# Demo data sources",
        "",
        f"Every image here is a {crop_size}x{crop_size} crop of a real medical image that ships inside",
        "a PyPI package; nothing was downloaded. Class = source image.",
        "",
        "| dataset | class | source file | package | licence |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {s.dataset} | {s.label} | {s.description} | {s.package} | {s.licence} |" for s in SOURCES]
    return "\n".join(lines) + "\n"
