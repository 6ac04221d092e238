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
volumes    t1           ``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``:   nilearn
                        MNI ICBM152 2009a T1 template, skull-stripped, 1 mm
volumes    anat         ``anatomical.nii``: one subject's T1 MR, normalised     nibabel
                        to MNI space by SPM, 2 mm (``nibabel/tests/data``)
volumes    epi          ``example4d.nii.gz``: first volume of a T2* EPI fMRI    nibabel
                        series, 2 x 2 x 2.2 mm (``nibabel/tests/data``)
========== ============ ======================================================= ==================

Each 2D source is resampled to a common scale and cut into random square crops (64x64 by default)
that hold tissue, split into ``train/`` and ``heldout/``, and written as PNG (16-bit grayscale for
``xray``, 8-bit RGB for ``color``) in the ``DATA/<class>/`` layout the readers take.

Each volume is resampled to 1.25 mm isotropic voxels (the template is shrunk from 1 mm; the nibabel
volumes, 25 and 24 slices thick, are upsampled linearly so that they hold 32-voxel crops) and cut
into random cubic crops (32^3 by default) at least half in tissue, written as 16-bit ``.nii.gz``
with their spacing, origin and direction.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medfusion import __version__
from medfusion.data.image import MedicalImage
from medfusion.data.readers import read_image
from medfusion.data.transforms import NormalizeIntensity, Resample, Resize, _physical_offset
from medfusion.data.writers import to_unsigned, write_image
from medfusion.utils import atomic_dir

DEMO_FORMAT_VERSION = 2  # 2: the volumes dataset, and demo.json records which datasets a folder holds
VOLUME_SPACING_MM = 1.25


@dataclass(frozen=True)
class DemoSource:
    """One class of a demo dataset: where its image comes from and how it is scaled.

    2D sources shrink by the integer ``downscale``; volumes are resampled to ``spacing`` (mm,
    isotropic) instead. A crop holds tissue when at least ``min_foreground`` of its voxels are
    above the image's background level (besides the checks of :func:`_crops`).
    """

    dataset: str
    label: str
    description: str
    package: str
    licence: str
    load: Callable[[], MedicalImage]
    downscale: int
    bit_depth: int
    spacing: float | None = None
    min_foreground: float = 0.0


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


def _volume_source(module: str, package: str, relative_path: str) -> Callable[[], MedicalImage]:
    """A NIfTI file inside an installed package, found without importing the package (importing
    nilearn would pull in pandas and scikit-learn); of a 4D series, the first volume."""

    def load() -> MedicalImage:
        _require(module, package)
        path = Path(next(iter(importlib.util.find_spec(module).submodule_search_locations)), relative_path)
        if not path.is_file():
            raise RuntimeError(f"{relative_path} is missing from the installed {package} package")
        image = read_image(path)
        return image.replace(array=image.array[:1])  # (1, D, H, W); a 4D NIfTI reads as (T, D, H, W)

    return load


_CC0 = "CC0 1.0 (Häggström 2014, Wikimedia Commons)"
_CMMI = "no known copyright restrictions (CMMI)"
_PYDICOM_LICENCE = "MIT (pydicom-data package); DICOM test images published for interoperability testing"
_MNI_LICENCE = (
    "MNI ICBM152 notice (below): use, copy, modify and distribute with the copyright notice; "
    "shipped in nilearn (BSD-3-Clause)"
)
_NIBABEL_LICENCE = "MIT (nibabel package, COPYING; the file is not listed among its third-party data)"
MNI_NOTICE = """\
Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University.

Permission to use, copy, modify, and distribute this software and its
documentation for any purpose and without fee is hereby granted, provided
that the above copyright notice appear in all copies.  The authors and
McGill University make no representations about the suitability of this
software for any purpose.  It is provided "as is" without express or
implied warranty.  The authors are not responsible for any data loss,
equipment damage, property loss, or injury to subjects or patients
resulting from the use or misuse of this software package.
"""
_MNI_T1 = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
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
    DemoSource("volumes", "t1", f"nilearn/{_MNI_T1}, MNI ICBM152 2009a T1 template (average of 152 adults), "
               "skull-stripped, 1 mm", "nilearn", _MNI_LICENCE, _volume_source("nilearn", "nilearn", _MNI_T1),
               1, 16, spacing=VOLUME_SPACING_MM, min_foreground=0.5),
    DemoSource("volumes", "anat", "nibabel/tests/data/anatomical.nii, one subject's T1 MR normalised to MNI "
               "space by SPM, 2 mm", "nibabel", _NIBABEL_LICENCE,
               _volume_source("nibabel", "nibabel", "tests/data/anatomical.nii"),
               1, 16, spacing=VOLUME_SPACING_MM, min_foreground=0.5),
    DemoSource("volumes", "epi", "nibabel/tests/data/example4d.nii.gz (first volume), T2* EPI fMRI, "
               "2 x 2 x 2.2 mm", "nibabel", _NIBABEL_LICENCE,
               _volume_source("nibabel", "nibabel", "tests/data/example4d.nii.gz"),
               1, 16, spacing=VOLUME_SPACING_MM, min_foreground=0.5),
)  # fmt: skip
DATASETS = tuple(dict.fromkeys(source.dataset for source in SOURCES))


def default_demo_dir() -> Path:
    """``$MEDFUSION_CACHE/demo-data``, else ``$XDG_CACHE_HOME/medfusion/demo-data``, else ``~/.cache/...``."""
    if os.environ.get("MEDFUSION_CACHE"):
        return Path(os.environ["MEDFUSION_CACHE"]) / "demo-data"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "medfusion" / "demo-data"


def _crops(
    image: MedicalImage,
    size: int,
    count: int,
    rng: np.random.Generator,
    min_std: float,
    min_foreground: float = 0.0,
) -> list[MedicalImage]:
    """``count`` random crops of side ``size`` of a (C, *spatial) float image in [-1, 1] holding tissue.

    A crop holds tissue when its mean is above the background level (the 20th percentile), its
    standard deviation above ``min_std`` and at least ``min_foreground`` of its voxels above the
    background level; up to 50 tries per crop, then the best seen (highest deviation) is taken.
    Each crop keeps the spacing and direction, with its own origin.
    """
    array = np.asarray(image.array)
    shape = image.spatial_shape
    if any(s < size for s in shape):
        raise ValueError(
            f"{image.path}: source image {'x'.join(map(str, shape))} (after resampling) is smaller "
            f"than the crop size {size}"
        )
    background = float(np.percentile(array.mean(axis=0), 20))
    crops = []
    for _ in range(count):
        best, best_score = None, -np.inf
        for _ in range(50):
            start = tuple(int(rng.integers(0, s - size + 1)) for s in shape)
            crop = array[(slice(None), *(slice(i, i + size) for i in start))]
            score = float(crop.std())
            foreground = float((crop.mean(axis=0) > background).mean()) if min_foreground > 0 else 1.0
            if crop.mean() > background and score > min_std and foreground >= min_foreground:
                best = (start, crop)
                break
            if score > best_score:
                best, best_score = (start, crop), score
        start, crop = best
        crops.append(image.replace(array=crop, origin=_physical_offset(image, start)))
    return crops


def _check_datasets(datasets: Sequence[str] | None) -> tuple[str, ...]:
    if datasets is None:
        return DATASETS
    if isinstance(datasets, str):
        datasets = (datasets,)
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown or not datasets:
        raise ValueError(f"datasets must be one or more of {', '.join(DATASETS)}; got {list(datasets)}")
    return tuple(d for d in DATASETS if d in datasets)


def _held_datasets(marker: Path, settings: dict) -> tuple[str, ...]:
    """The datasets a demo folder holds if its ``demo.json`` was written with ``settings``, else ()."""
    try:
        meta = json.loads(marker.read_text())
        if meta["settings"] == settings:
            return tuple(meta["datasets"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or unreadable marker: rebuild
    return ()


def build_demo_data(
    out: str | os.PathLike | None = None,
    crop_size: int = 64,
    per_class: int = 256,
    heldout_fraction: float = 0.25,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    datasets: Sequence[str] | None = None,
    volume_crop_size: int = 32,
    volume_per_class: int = 96,
) -> Path:
    """Write the demo datasets to ``out`` (once; later calls reuse a complete folder).

    A folder is reused when it was built with the same settings and holds every dataset asked
    for; asked for a dataset it lacks, it is rebuilt with the datasets it held and the new ones.

    Args:
        out: target folder; default :func:`default_demo_dir`.
        crop_size: side of the square 2D crops, in pixels.
        per_class: 2D crops per class (train + held-out; the default holds out 64, enough for
            the evaluation's real-vs-real references).
        heldout_fraction: share of each class written to ``heldout/``.
        seed: seed of the crop positions.
        force: rebuild even when a complete folder with the same settings exists.
        progress: show a progress bar.
        datasets: which of ``xray``, ``color``, ``volumes`` to build; default all.
        volume_crop_size: side of the cubic 3D crops, in voxels (at most 40: the thinnest source
            volume is 40 voxels deep at 1.25 mm).
        volume_per_class: 3D crops per class (train + held-out; the default holds out 24).

    Returns:
        The folder, holding ``<dataset>/{train,heldout}/<class>/*.png`` (2D) or ``*.nii.gz``
        (volumes), ``DATA_SOURCES.md`` and ``demo.json`` (settings, datasets held, counts).
    """
    for name, value in (("crop_size", crop_size), ("volume_crop_size", volume_crop_size)):
        if value < 8:
            raise ValueError(f"{name} must be at least 8; got {value}")
    for name, value in (("per_class", per_class), ("volume_per_class", volume_per_class)):
        if value < 2:
            raise ValueError(f"{name} must be at least 2 (train and held-out); got {value}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1); got {heldout_fraction}")
    wanted = _check_datasets(datasets)
    out = Path(out) if out is not None else default_demo_dir()
    settings = {
        "format": DEMO_FORMAT_VERSION,
        "crop_size": crop_size,
        "per_class": per_class,
        "volume_crop_size": volume_crop_size,
        "volume_per_class": volume_per_class,
        "heldout_fraction": heldout_fraction,
        "seed": seed,
    }
    marker = out / "demo.json"
    held = () if force else _held_datasets(marker, settings)
    if set(wanted) <= set(held):
        return out
    wanted = tuple(d for d in DATASETS if d in wanted or d in held)
    if out.exists() and not marker.is_file() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not a medfusion demo folder; choose another folder")
    sources = [s for s in SOURCES if s.dataset in wanted]
    counts: dict[str, dict[str, int]] = {}
    with atomic_dir(out, overwrite=True) as tmp:
        for source in tqdm(sources, desc="demo data", unit="class", disable=not progress):
            rng = np.random.default_rng([seed, SOURCES.index(source)])
            image = _scaled_source(source, rng)
            size, count = (
                (volume_crop_size, volume_per_class) if image.spatial_dims == 3 else (crop_size, per_class)
            )
            n_heldout = max(1, round(count * heldout_fraction))
            crops = _crops(image, size, count, rng, min_std=0.05, min_foreground=source.min_foreground)
            suffix = ".nii.gz" if image.spatial_dims == 3 else ".png"
            for i, crop in enumerate(crops):
                split = "heldout" if i < n_heldout else "train"
                path = tmp / source.dataset / split / source.label / f"{source.label}_{i:04d}{suffix}"
                write_image(path, crop.replace(array=to_unsigned(crop.array, source.bit_depth)))
            counts.setdefault(source.dataset, {})[source.label] = count
        (tmp / "DATA_SOURCES.md").write_text(
            _sources_markdown(sources, crop_size, volume_crop_size), encoding="utf-8"
        )
        meta = {"medfusion": __version__, "settings": settings, "datasets": list(wanted), "counts": counts}
        (tmp / "demo.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out


def _scaled_source(source: DemoSource, rng: np.random.Generator) -> MedicalImage:
    """The source image with intensities in [-1, 1], at the dataset's common scale."""
    image = source.load()
    image = NormalizeIntensity("percentile", percentiles=(0.5, 99.5))(image, rng)
    if source.spacing is not None:
        return Resample(source.spacing, mode="auto")(image, rng)  # area when shrinking, else linear
    if source.downscale > 1:
        size = tuple(s // source.downscale for s in image.spatial_shape)
        return Resize(size, mode="area")(image, rng)
    return image


def _sources_markdown(sources: Sequence[DemoSource], crop_size: int, volume_crop_size: int) -> str:
    sizes = []
    if any(s.spacing is None for s in sources):
        sizes.append(f"2D: {crop_size}x{crop_size} pixels")
    if any(s.spacing is not None for s in sources):
        side = volume_crop_size
        sizes.append(f"volumes: {side}x{side}x{side} voxels of {VOLUME_SPACING_MM} mm")
    lines = [
        "# Demo data sources",
        "",
        "Every image here is a crop of a real medical image that ships inside a PyPI package",
        f"({'; '.join(sizes)}); nothing was downloaded. Class = source image.",
        "",
        "| dataset | class | source file | package | licence |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {s.dataset} | {s.label} | {s.description} | {s.package} | {s.licence} |" for s in sources]
    if any(s.licence == _MNI_LICENCE for s in sources):
        lines += [
            "",
            "## MNI ICBM152 template notice",
            "",
            "nilearn's description of the template gives its licence as 'unknown'; the MNI releases",
            "the ICBM152 2009 templates under this notice (quoted in nibabel's COPYING, where",
            "'software' refers to the image):",
            "",
            "```",
            MNI_NOTICE.rstrip(),
            "```",
        ]
    return "\n".join(lines) + "\n"
