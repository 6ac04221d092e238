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

The ``segmentation`` dataset holds image/mask pairs instead of classes, one folder per set:

============ ================================================================= ===================
set          source                                                            package
============ ================================================================= ===================
nuclei-2d    ``img2d.tif`` + ``mask2d.tif``: fluorescence nuclei and their     stardist (optional:
             instance masks, 2018 Data Science Bowl (``stardist/data/images``) skipped if missing)
brain-2d     the MNI T1 above with its grey- and white-matter probability maps nilearn
brain-3d     (``mni_icbm152_{gm,wm}_tal_nlin_sym_09a_converted.nii.gz``)       nilearn
============ ================================================================= ===================

``segmentation/<set>/images/`` and ``masks/`` hold the training pairs, ``test-images/`` and
``test-masks/`` the test pairs; an image and its mask have the same name. Masks are label maps
(:func:`label_map`: 1 + the most probable foreground label where its probability exceeds 0.5,
else 0): binary nuclei (any instance), and background / grey matter / white matter for the brain.
``nuclei-2d`` holds 64x64 crops, ``brain-2d`` whole axial slices resized to 64x64 (the
probability maps resized with them, then thresholded), ``brain-3d`` 32^3 crops at the template's
1 mm, at least half brain, written as NIfTI with their geometry (the mask with the image's).
Each source is split by position, not at random (:func:`_split`): test pairs come from its last
part along one axis (the nuclei image's right-hand columns, the brain's superior slab, shared by
both brain sets) and training pairs from the rest, 8 voxels away, so that no test pixel is in a
training pair; every pair's box in its source is recorded in ``demo.json``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
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

DEMO_FORMAT_VERSION = 3  # 2: the volumes dataset, and demo.json records which datasets a folder holds;
# 3: the segmentation dataset
VOLUME_SPACING_MM = 1.25
SEGMENTATION = "segmentation"
LABEL_THRESHOLD = 0.5  # a pixel takes a foreground label where that label's probability exceeds this
SPLIT_GAP = 8  # source voxels between a segmentation set's training region and its test region
PAIR_FOLDERS = {"train": ("images", "masks"), "test": ("test-images", "test-masks")}
AXIS_NAMES = {2: ("y", "x"), 3: ("z", "y", "x")}  # array order
_EXTENT_SHARE = 0.05  # the foreground's extent along an axis: where it covers this share of its widest
_SQUARE_MARGIN = 4  # source pixels around the foreground's in-plane box, for whole-slice sets


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


def _package_file(module: str, package: str, relative_path: str) -> Path:
    """A file inside an installed package, found without importing the package (importing nilearn
    would pull in pandas and scikit-learn, importing stardist its compiled code and plotting)."""
    _require(module, package)
    path = Path(next(iter(importlib.util.find_spec(module).submodule_search_locations)), relative_path)
    if not path.is_file():
        raise RuntimeError(f"{relative_path} is missing from the installed {package} package")
    return path


def _volume_source(module: str, package: str, relative_path: str) -> Callable[[], MedicalImage]:
    """A NIfTI file inside an installed package; of a 4D series, the first volume."""

    def load() -> MedicalImage:
        image = read_image(_package_file(module, package, relative_path))
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


@dataclass(frozen=True)
class LabelledImage:
    """A source image and, on its grid, the probability of each foreground label.

    Attributes:
        image: ``(1, *spatial)``, as read.
        probabilities: ``(K, *spatial)`` floats in [0, 1]; channel ``k`` is label ``k + 1``.
    """

    image: MedicalImage
    probabilities: np.ndarray


@dataclass(frozen=True)
class PairSource:
    """One image/mask set of the ``segmentation`` dataset: where it comes from and how it is cut.

    The source is split by position along ``split_axis`` (array order) into a training and a test
    region (:func:`_split`; ``split_note`` says where the test region lies). With ``slices`` each
    pair is a whole slice across that axis (the foreground's square, resized); otherwise a crop
    whose foreground share lies in [``min_foreground``, ``max_foreground``] (else the closest of
    50 tries). An ``optional`` set is skipped with a warning when ``module`` is not installed.
    """

    name: str
    stem: str
    description: str
    package: str
    module: str
    licence: str
    load: Callable[[], LabelledImage]
    labels: tuple[str, ...]
    spatial_dims: int
    bit_depth: int
    split_axis: int
    split_note: str
    slices: bool = False
    min_foreground: float = 0.0
    max_foreground: float = 1.0
    optional: bool = False


def _probability_map(image: MedicalImage) -> np.ndarray:
    """A stored probability map in [0, 1]: integers over their type's range (the MNI maps are uint8)."""
    array = np.asarray(image.array)
    if np.issubdtype(array.dtype, np.integer):
        array = array / np.iinfo(array.dtype).max
    array = array.astype(np.float32)
    if array.min() < 0 or array.max() > 1:
        raise RuntimeError(f"{image.path}: probabilities outside [0, 1] ({array.min()} to {array.max()})")
    return array


def _check_same_grid(reference: MedicalImage, other: MedicalImage) -> None:
    if other.spatial_shape != reference.spatial_shape or not (
        np.allclose(other.spacing, reference.spacing)
        and np.allclose(other.origin, reference.origin)
        and np.allclose(other.direction, reference.direction)
    ):
        raise RuntimeError(
            f"{other.path}: its grid ({'x'.join(map(str, other.spatial_shape))}, spacing {other.spacing}, "
            f"origin {other.origin}) is not that of {reference.path}"
        )


_STARDIST_IMAGE = "data/images/img2d.tif"
_STARDIST_MASK = "data/images/mask2d.tif"
_MNI_GM = "datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
_MNI_WM = "datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
_STARDIST_LICENCE = (
    "BSD-3-Clause (stardist package); the image and its annotation are from the 2018 Data Science Bowl "
    "(BBBC038), whose own terms the package does not restate"
)


def _load_nuclei() -> LabelledImage:
    image = read_image(_package_file("stardist", "stardist", _STARDIST_IMAGE))
    instances = read_image(_package_file("stardist", "stardist", _STARDIST_MASK))
    _check_same_grid(image, instances)
    return LabelledImage(image, (np.asarray(instances.array) > 0).astype(np.float32))  # any nucleus


def _load_brain() -> LabelledImage:
    t1 = read_image(_package_file("nilearn", "nilearn", _MNI_T1))
    maps = [read_image(_package_file("nilearn", "nilearn", path)) for path in (_MNI_GM, _MNI_WM)]
    for tissue in maps:
        _check_same_grid(t1, tissue)
    return LabelledImage(t1, np.concatenate([_probability_map(tissue) for tissue in maps]))


_BRAIN = (
    "nilearn/" + _MNI_T1 + " with its grey- and white-matter probability maps (mni_icbm152_gm_..., _wm_...)"
)
_BRAIN_LABELS = ("background", "grey matter", "white matter")
_BRAIN_SPLIT = "the superior axial slab (z), the same for brain-2d and brain-3d"
SEGMENTATION_SOURCES = (
    PairSource("nuclei-2d", "nuclei", "stardist/data/images/img2d.tif and mask2d.tif, fluorescence "
               "microscopy of nuclei with instance masks, 2018 Data Science Bowl (Caicedo et al. 2019), "
               "512x512", "stardist", "stardist", _STARDIST_LICENCE, _load_nuclei, ("background", "nucleus"),
               2, 8, split_axis=1, split_note="the right-hand columns (x)", min_foreground=0.05,
               max_foreground=0.95, optional=True),
    PairSource("brain-2d", "brain", f"{_BRAIN}; whole axial slices", "nilearn", "nilearn", _MNI_LICENCE,
               _load_brain, _BRAIN_LABELS, 2, 16, split_axis=0, split_note=_BRAIN_SPLIT, slices=True),
    PairSource("brain-3d", "brain", f"{_BRAIN}; crops at 1 mm, at least half brain", "nilearn", "nilearn",
               _MNI_LICENCE, _load_brain, _BRAIN_LABELS, 3, 16, split_axis=0, split_note=_BRAIN_SPLIT,
               min_foreground=0.5),
)  # fmt: skip
DATASETS = (*dict.fromkeys(source.dataset for source in SOURCES), SEGMENTATION)


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


def _available(source: PairSource) -> bool:
    return importlib.util.find_spec(source.module) is not None


def _held_datasets(marker: Path, settings: dict) -> tuple[str, ...]:
    """The datasets a demo folder holds if its ``demo.json`` was written with ``settings``, else ().

    A segmentation set skipped for a missing package that is installed now makes the
    ``segmentation`` dataset count as not held, so that it is built again, complete."""
    try:
        meta = json.loads(marker.read_text())
        if meta["settings"] == settings:
            skipped = meta.get("skipped", {})
            if any(_available(s) for s in SEGMENTATION_SOURCES if s.name in skipped):
                return tuple(d for d in meta["datasets"] if d != SEGMENTATION)
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
    pairs_per_set: int = 48,
) -> Path:
    """Write the demo datasets to ``out`` (once; later calls reuse a complete folder).

    A folder is reused when it was built with the same settings and holds every dataset asked
    for; asked for a dataset it lacks, it is rebuilt with the datasets it held and the new ones.

    Args:
        out: target folder; default :func:`default_demo_dir`.
        crop_size: side of the square 2D crops, in pixels (also of the 2D segmentation pairs).
        per_class: 2D crops per class (train + held-out; the default holds out 64, enough for
            the evaluation's real-vs-real references).
        heldout_fraction: share of each class written to ``heldout/`` (of each segmentation set,
            to ``test-images/``, and of each segmentation source's extent kept for them).
        seed: seed of the crop positions.
        force: rebuild even when a complete folder with the same settings exists.
        progress: show a progress bar.
        datasets: which of ``xray``, ``color``, ``volumes``, ``segmentation`` to build; default all.
        volume_crop_size: side of the cubic 3D crops, in voxels (at most 40: the thinnest source
            volume is 40 voxels deep at 1.25 mm; also of the 3D segmentation pairs).
        volume_per_class: 3D crops per class (train + held-out; the default holds out 24).
        pairs_per_set: image/mask pairs per segmentation set (train + test; the default tests 12).

    Returns:
        The folder, holding ``<dataset>/{train,heldout}/<class>/*.png`` (2D) or ``*.nii.gz``
        (volumes), ``segmentation/<set>/{images,masks,test-images,test-masks}/``,
        ``DATA_SOURCES.md`` and ``demo.json`` (settings, datasets held, counts, and per
        segmentation set its labels, label fractions, split and the box of every pair).
    """
    for name, value in (("crop_size", crop_size), ("volume_crop_size", volume_crop_size)):
        if value < 8:
            raise ValueError(f"{name} must be at least 8; got {value}")
    for name, value in (
        ("per_class", per_class),
        ("volume_per_class", volume_per_class),
        ("pairs_per_set", pairs_per_set),
    ):
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
        "pairs_per_set": pairs_per_set,
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
    pair_sources = [
        s for s in SEGMENTATION_SOURCES if SEGMENTATION in wanted and (_available(s) or not s.optional)
    ]
    skipped = {
        s.name: f"needs the package {s.package!r}, which is not installed; "
        f'install it (pip install "medfusion[segmentation]") and build again'
        for s in SEGMENTATION_SOURCES
        if SEGMENTATION in wanted and s not in pair_sources
    }
    for name, reason in skipped.items():
        warnings.warn(f"demo data: skipping the segmentation set {name}: it {reason}", stacklevel=2)
    meta = {"medfusion": __version__, "settings": settings, "datasets": list(wanted)}
    bar = tqdm(total=len(sources) + len(pair_sources), desc="demo data", unit="set", disable=not progress)
    with bar, atomic_dir(out, overwrite=True) as tmp:
        sizes = {"crop_size": crop_size, "volume_crop_size": volume_crop_size}
        counts = _write_classes(
            tmp, sources, per_class, volume_per_class, heldout_fraction, seed, bar, **sizes
        )
        pairs = _write_segmentation(
            tmp / SEGMENTATION, pair_sources, pairs_per_set, heldout_fraction, seed, bar, **sizes
        )
        if pair_sources:
            counts[SEGMENTATION] = {name: sum(p["pairs"].values()) for name, p in pairs.items()}
            meta |= {SEGMENTATION: pairs, "skipped": skipped}
        (tmp / "DATA_SOURCES.md").write_text(
            _sources_markdown(sources, pair_sources, skipped, crop_size, volume_crop_size), encoding="utf-8"
        )
        (tmp / "demo.json").write_text(json.dumps(meta | {"counts": counts}, indent=2), encoding="utf-8")
    return out


def _write_classes(
    tmp: Path,
    sources: Sequence[DemoSource],
    per_class: int,
    volume_per_class: int,
    heldout_fraction: float,
    seed: int,
    bar: tqdm,
    crop_size: int,
    volume_crop_size: int,
) -> dict[str, dict[str, int]]:
    """Write the crops of the class-labelled datasets; returns the crops per dataset and class."""
    counts: dict[str, dict[str, int]] = {}
    for source in sources:
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
        bar.update()
    return counts


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


def label_map(probabilities: np.ndarray) -> np.ndarray:
    """Labels from foreground probabilities: ``1 + k`` for the most probable foreground label ``k``
    where its probability exceeds :data:`LABEL_THRESHOLD`, else 0 (background).

    Args:
        probabilities: ``(K, *spatial)`` in [0, 1]; channel ``k`` is label ``k + 1``.

    Returns:
        ``(1, *spatial)`` uint8 label map.
    """
    probabilities = np.asarray(probabilities)
    top = probabilities.max(axis=0)
    return np.where(top > LABEL_THRESHOLD, probabilities.argmax(axis=0) + 1, 0).astype(np.uint8)[None]


@dataclass(frozen=True)
class _Prepared:
    image: MedicalImage  # (1, *spatial) floats in [-1, 1]
    probabilities: np.ndarray  # (K, *spatial), as loaded
    labels: np.ndarray  # (1, *spatial) uint8: label_map(probabilities)


@dataclass(frozen=True)
class _Pair:
    image: MedicalImage  # (1, *spatial) floats in [-1, 1]
    mask: np.ndarray  # (1, *spatial) uint8 labels
    box: tuple[tuple[int, int], ...]  # where it lies in the source: (start, stop) per axis, array order


def _split(labels: np.ndarray, axis: int, heldout_fraction: float, depth: int, name: str) -> dict:
    """Split a source by position along ``axis``: the training and test regions and the
    foreground's extent, as index ranges ``(start, stop)`` of that axis.

    The foreground's extent is where it covers at least 5% of its widest cross-section; the test
    region starts where the last ``heldout_fraction`` of that extent does (at least ``depth``
    slices: the deepest pair cut from this source) and runs to the source's end; the training
    region runs from the source's start to :data:`SPLIT_GAP` slices before the test region.
    """
    foreground = labels[0] > 0
    across = foreground.sum(axis=tuple(a for a in range(foreground.ndim) if a != axis))
    if across.max() == 0:
        raise RuntimeError(f"{name}: the source's label maps hold no foreground")
    rows = np.flatnonzero(across >= _EXTENT_SHARE * across.max())
    extent = (int(rows[0]), int(rows[-1]) + 1)
    boundary = extent[1] - max(round((extent[1] - extent[0]) * heldout_fraction), depth)
    train = (0, boundary - SPLIT_GAP)
    axis_name = AXIS_NAMES[foreground.ndim][axis]
    if train[1] - train[0] < depth or train[1] <= extent[0]:
        raise ValueError(
            f"{name}: no room along {axis_name} for a training and a test region {depth} deep each, "
            f"{SPLIT_GAP} apart, with heldout_fraction {heldout_fraction} (the foreground spans "
            f"{extent[0]} to {extent[1]} of {len(across)})"
        )
    return {"axis": axis_name, "train": train, "test": (boundary, len(across)), "foreground": extent}


def _crop_pairs(
    source: PairSource,
    prepared: _Prepared,
    region: tuple[int, int],
    size: int,
    count: int,
    rng: np.random.Generator,
) -> list[_Pair]:
    """``count`` random crops of side ``size`` lying in ``region`` along the split axis (anywhere
    along the others) whose foreground share is in the source's bounds: the first of 50 tries
    that is, else the closest."""
    image, labels = prepared.image, prepared.labels
    shape = image.spatial_shape
    if any(s < size for s in shape):
        raise ValueError(
            f"{source.name}: source {'x'.join(map(str, shape))} is smaller than the crop size {size}"
        )
    ranges = [(0, s - size + 1) for s in shape]
    ranges[source.split_axis] = (region[0], region[1] - size + 1)
    pairs = []
    for _ in range(count):
        best, best_score = None, -np.inf
        for _ in range(50):
            start = tuple(int(rng.integers(low, high)) for low, high in ranges)
            index = (slice(None), *(slice(i, i + size) for i in start))
            share = float((labels[index] > 0).mean())
            score = min(share - source.min_foreground, source.max_foreground - share)
            if score > best_score:
                best, best_score = start, score
            if score >= 0:
                break
        index = (slice(None), *(slice(i, i + size) for i in best))
        crop = image.replace(array=np.asarray(image.array)[index], origin=_physical_offset(image, best))
        pairs.append(_Pair(crop, labels[index], tuple((i, i + size) for i in best)))
    return pairs


def _square_around(foreground: np.ndarray, axis: int) -> tuple[int, list[int]]:
    """The side and the starts (along every axis but ``axis``) of the square that holds the
    foreground of every slice across ``axis``, with a margin, centred on it and inside the source."""
    boxes = []
    for a in (a for a in range(foreground.ndim) if a != axis):
        rows = np.flatnonzero(foreground.any(axis=tuple(b for b in range(foreground.ndim) if b != a)))
        boxes.append((int(rows[0]), int(rows[-1]) + 1, foreground.shape[a]))
    side = min(max(stop - start for start, stop, _ in boxes) + 2 * _SQUARE_MARGIN, *(n for *_, n in boxes))
    return side, [min(max((start + stop - side) // 2, 0), n - side) for start, stop, n in boxes]


def _write_segmentation(
    folder: Path,
    sources: Sequence[PairSource],
    count: int,
    heldout_fraction: float,
    seed: int,
    bar: tqdm,
    crop_size: int,
    volume_crop_size: int,
) -> dict[str, dict]:
    """Write every set of ``sources`` under ``folder``; returns what ``demo.json`` records of each."""
    prepared: dict[Callable[[], LabelledImage], _Prepared] = {}  # the two brain sets share one
    meta = {}
    for source in sources:
        rng = np.random.default_rng([seed, SEGMENTATION_SOURCES.index(source), 1])
        if source.load not in prepared:
            labelled = source.load()
            image = NormalizeIntensity("percentile", percentiles=(0.5, 99.5))(labelled.image, rng)
            probabilities = labelled.probabilities
            prepared[source.load] = _Prepared(image, probabilities, label_map(probabilities))
        # the sets cut from one source share its split: no test pixel of one is in the other's training
        depth = max(
            1 if s.slices else (volume_crop_size if s.spatial_dims == 3 else crop_size)
            for s in SEGMENTATION_SOURCES
            if s.load is source.load
        )
        size = volume_crop_size if source.spatial_dims == 3 else crop_size
        meta[source.name] = _write_pair_set(
            folder / source.name, source, prepared[source.load], size, count, heldout_fraction, depth, rng
        )
        bar.update()
    return meta


def _write_pair_set(
    folder: Path,
    source: PairSource,
    prepared: _Prepared,
    size: int,
    count: int,
    heldout_fraction: float,
    depth: int,
    rng: np.random.Generator,
) -> dict:
    split = _split(prepared.labels, source.split_axis, heldout_fraction, depth, source.name)
    n_test = min(max(1, round(count * heldout_fraction)), count - 1)  # at least one of each
    suffix = ".nii.gz" if source.spatial_dims == 3 else ".png"
    meta: dict = {"labels": list(source.labels), "shape": [size] * source.spatial_dims, "split": split}
    meta |= {"pairs": {}, "label_fractions": {}, "boxes": {}}
    index = 0
    for part, n in (("test", n_test), ("train", count - n_test)):
        if source.slices:
            pairs = _slice_pairs(source, prepared, split[part], split["foreground"], size, n, rng)
        else:
            pairs = _crop_pairs(source, prepared, split[part], size, n, rng)
        images, masks = PAIR_FOLDERS[part]
        voxels = np.zeros(len(source.labels), dtype=np.int64)
        meta["boxes"][part] = {}
        for pair in pairs:
            name = f"{source.stem}_{index:04d}"
            index += 1
            image_file = pair.image.replace(array=to_unsigned(pair.image.array, source.bit_depth))
            write_image(folder / images / f"{name}{suffix}", image_file)
            write_image(folder / masks / f"{name}{suffix}", pair.image.replace(array=pair.mask))
            voxels += np.bincount(pair.mask.ravel(), minlength=len(source.labels))
            meta["boxes"][part][name] = [list(b) for b in pair.box]
        meta["pairs"][part] = n
        meta["label_fractions"][part] = [round(float(v), 4) for v in voxels / max(voxels.sum(), 1)]
    return meta


def _slice_pairs(
    source: PairSource,
    prepared: _Prepared,
    region: tuple[int, int],
    extent: tuple[int, int],
    size: int,
    count: int,
    rng: np.random.Generator,
) -> list[_Pair]:
    """``count`` distinct slices across the split axis, in ``region`` and the foreground's
    ``extent``: the square around the foreground (over all slices), resized to ``size`` by area,
    the probability maps with it (then :func:`label_map`)."""
    axis = source.split_axis
    candidates = np.arange(max(region[0], extent[0]), min(region[1], extent[1]))
    if len(candidates) < count:
        raise ValueError(
            f"{source.name}: pairs_per_set asks for {count} slices from a region of {len(candidates)}"
        )
    side, starts = _square_around(prepared.labels[0] > 0, axis)
    resize = Resize(size, mode="area")

    def cut(array, index: tuple[slice, ...]) -> np.ndarray:  # (C, side, side) -> (C, size, size)
        plane = np.asarray(array)[index].reshape(len(array), side, side)
        return np.asarray(resize(MedicalImage.from_array(plane), rng).array)

    pairs = []
    for z in sorted(int(z) for z in rng.choice(candidates, size=count, replace=False)):
        box = [(i, i + side) for i in starts]
        box.insert(axis, (z, z + 1))
        index = (slice(None), *(slice(*b) for b in box))
        image = MedicalImage.from_array(cut(prepared.image.array, index))
        pairs.append(_Pair(image, label_map(cut(prepared.probabilities, index)), tuple(box)))
    return pairs


def _sources_markdown(
    sources: Sequence[DemoSource],
    pair_sources: Sequence[PairSource],
    skipped: dict[str, str],
    crop_size: int,
    volume_crop_size: int,
) -> str:
    sizes = []
    if any(s.spacing is None for s in sources):
        sizes.append(f"2D: {crop_size}x{crop_size} pixels")
    if any(s.spacing is not None for s in sources):
        side = volume_crop_size
        sizes.append(f"volumes: {side}x{side}x{side} voxels of {VOLUME_SPACING_MM} mm")
    lines = [
        "# Demo data sources",
        "",
        "Every image here is cut from a real medical image that ships inside a PyPI package;",
        "nothing was downloaded.",
    ]
    if sources:
        lines += [
            "",
            f"Classification crops ({'; '.join(sizes)}). Class = source image.",
            "",
            "| dataset | class | source file | package | licence |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {s.dataset} | {s.label} | {s.description} | {s.package} | {s.licence} |" for s in sources
        ]
    if pair_sources or skipped:
        lines += _segmentation_markdown(pair_sources, skipped, crop_size, volume_crop_size)
    if any(s.licence == _MNI_LICENCE for s in (*sources, *pair_sources)):
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


def _segmentation_markdown(
    pair_sources: Sequence[PairSource], skipped: dict[str, str], crop_size: int, volume_crop_size: int
) -> list[str]:
    lines = [
        "",
        "## Segmentation pairs",
        "",
        f"`{SEGMENTATION}/<set>/images/` and `masks/` hold the training pairs, `test-images/` and",
        "`test-masks/` the test pairs; an image and its mask have the same file name. Masks are",
        "integer label maps: 8-bit PNG for 2D, uint8 NIfTI for 3D with the image's spacing, origin",
        "and direction. `demo.json` counts the pairs and the label fractions of every set.",
        "",
        "| set | size | labels | source files | package | licence |",
        "|---|---|---|---|---|---|",
    ]
    for s in pair_sources:
        size = "x".join([str(volume_crop_size if s.spatial_dims == 3 else crop_size)] * s.spatial_dims)
        labels = ", ".join(f"{value} {name}" for value, name in enumerate(s.labels))
        lines.append(f"| {s.name} | {size} | {labels} | {s.description} | {s.package} | {s.licence} |")
    lines += [
        "",
        "Labels: a pixel takes 1 + its most probable foreground label where that probability exceeds",
        f"{LABEL_THRESHOLD}, else 0 (background). nuclei-2d: the probability is 1 inside any nucleus",
        "of the instance mask, so the mask is binary (nucleus / background) and touching nuclei",
        "merge. brain-2d and brain-3d: the MNI grey- and white-matter probability maps, so background",
        "is CSF and everything outside the brain; brain-2d resizes each slice's maps with the image",
        "(area averaging) before thresholding, brain-3d keeps the template's 1 mm grid.",
        "",
        "Test pairs come from a region of the source disjoint from the training region: the source",
        "is split by position, not at random. Along one axis the test region starts where the last",
        f"`heldout_fraction` of the foreground's extent does and the training region ends {SPLIT_GAP} voxels",
        "before it, so no test pixel is in a training pair (though pixels near the border are alike).",
        "The box of every pair in its source grid is in `demo.json` (`segmentation.<set>.boxes`).",
        "",
    ]
    lines += [f"- {s.name}: the test region is {s.split_note}." for s in pair_sources]
    lines += [f"- {name}: skipped; it {reason}." for name, reason in skipped.items()]
    lines += [
        "",
        "No separate unlabelled sets: a set's `images/` folder is one (a flat folder reads as",
        "unlabelled), and it holds training-region pixels only, so a generator or a self-supervised",
        "pretraining run on it never sees a test pixel. The `volumes` dataset's t1 crops come from",
        "the whole template, the brain sets' test region included: do not pretrain on them when",
        "testing on brain-3d.",
    ]
    return lines
