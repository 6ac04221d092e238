"""Image/mask pairs for segmentation, 2D and 3D: finding them, checking them, reading them together.

Layout: a folder of images and a folder of masks (label maps), e.g. MONAI/Decathlon's ``imagesTr``
and ``labelsTr``. Both are searched recursively as :func:`~medfusion.data.discovery.discover`
does (hidden and sidecar files skipped, a folder holding one DICOM series is one sample), and an
image pairs with the mask of the same *name*: its path relative to its folder without the format
suffix (:func:`~medfusion.utils.full_suffix`). So ``case_01.nii.gz`` pairs with ``case_01.nii.gz``
or ``case_01.png``, ``ct/case_02.nii.gz`` with ``ct/case_02.mha``, and a DICOM series folder
``case_03/`` with ``case_03.nii.gz``.

A mask is one integer label map of its image's spatial shape: 0 is background and 1 ..
``num_classes - 1`` the classes (a binary mask holds 0 and 1). When a :class:`PairedDataset` opens,
every pair is checked and every problem is named by its file (or files):

- geometry, from the headers: the mask's spatial shape must equal its image's, and so must its
  spacing (within a relative :data:`SPACING_TOLERANCE`) where both formats carry one (PNG, JPEG,
  BMP and TIFF carry none). The mask then takes its image's geometry, so that both are resampled
  onto the same grid;
- values, from the mask's pixels: one channel, integer values (a mask holding 0.5 was resampled
  linearly somewhere), none negative and none >= ``num_classes``; optionally, no mask that is all
  background. ``num_classes`` (background included) is given or read from the masks (largest
  label + 1).

Transforms (:class:`PairedTransform`): the spatial steps of
:func:`~medfusion.data.dataset.build_transform` (resample, resize, crop or pad, flips) act on image
and mask with one draw of randomness (the same crop offsets, the same flips); the image keeps its
usual interpolation, the mask takes nearest neighbour (``nearest-exact``: pixel centres placed as
in the image's linear interpolation) so that its values stay labels, and pads with background.
Intensity normalisation touches the image only.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from medfusion.config import DataConfig
from medfusion.data.dataset import build_transform
from medfusion.data.discovery import Sample, discover
from medfusion.data.errors import DataError, Problem, format_problems
from medfusion.data.image import ImageInfo, MedicalImage
from medfusion.data.inspect import FileRecord, _vec, consistency_problems
from medfusion.data.readers import read_image, read_info
from medfusion.data.transforms import (
    Compose,
    CropOrPad,
    NormalizeIntensity,
    RandomFlip,
    Resample,
    Resize,
    Transform,
    as_float_tensor,
)
from medfusion.data.writers import WRITABLE_SUFFIXES, write_image
from medfusion.utils import full_suffix, inside

SPACING_TOLERANCE = 1e-3  # relative difference of a mask's spacing from its image's still accepted
NO_SPACING_FORMATS = ("png", "jpeg", "bmp", "tiff")  # readers that give unit spacing, not a measured one
MASK_INTERPOLATION = "nearest-exact"
MASK_PAD_VALUE = 0.0  # background
NAMES_SHOWN = 5  # names listed in a message before "... (N in all)"


@dataclass(frozen=True)
class Pair:
    """An image and its mask.

    Attributes:
        name: what pairs them: the path relative to its folder, without the format suffix.
        image: absolute path of the image file (or DICOM series folder).
        mask: absolute path of the mask.
    """

    name: str
    image: str
    mask: str

    @property
    def path(self) -> str:
        """The image: the file that messages naming one file per item show (as for a ``Sample``)."""
        return self.image


@dataclass(frozen=True)
class MaskLabels:
    """The label values of one mask and the voxels of each (both ascending by value)."""

    values: tuple[int, ...]
    counts: tuple[int, ...]

    @property
    def voxels(self) -> int:
        return sum(self.counts)

    @property
    def empty(self) -> bool:
        """All background (label 0)."""
        return all(v == 0 for v in self.values)


@dataclass(frozen=True)
class PairRecord:
    """One pair as checked: both headers, the mask's labels, and what is wrong.

    Attributes:
        pair: the pair.
        image_info, mask_info: the headers (None: unreadable, see ``problems``).
        labels: the mask's label values (None: not read, or not a valid label map).
        geometry: shape or spacing disagreements between mask and image.
        problems: everything else (unreadable files, mask channels or values).
    """

    pair: Pair
    image_info: ImageInfo | None
    mask_info: ImageInfo | None
    labels: MaskLabels | None
    geometry: tuple[Problem, ...] = ()
    problems: tuple[Problem, ...] = ()


# ------------------------------------------------------------------------------------------------
# Pairing by name


@dataclass(frozen=True)
class _Matching:
    """Pairs found, names found on one side only, and problems (discovery, duplicate names)."""

    pairs: tuple[Pair, ...]
    unmatched_images: tuple[str, ...]
    unmatched_masks: tuple[str, ...]
    problems: tuple[Problem, ...]


def _name(sample: Sample) -> str:
    """The name a sample pairs by: its relative path without the format suffix (a DICOM series
    folder: its relative path)."""
    if Path(sample.path).is_dir():
        return sample.relpath
    suffix = full_suffix(sample.relpath)
    return sample.relpath[: len(sample.relpath) - len(suffix)] if suffix else sample.relpath


def _by_name(root: Path, problems: list[Problem]) -> tuple[dict[str, str], set[str]]:
    """(name -> path for the names found once, the names found more than once) of a folder."""
    discovery = discover(root, labels="none")
    problems += discovery.problems
    found: dict[str, list[str]] = {}
    for sample in discovery.samples:
        found.setdefault(_name(sample), []).append(sample.path)
    duplicates = {name for name, paths in found.items() if len(paths) > 1}
    for name in sorted(duplicates):
        problems.append(
            Problem(
                str(root),
                f"{len(found[name])} files are named {name!r}: {' and '.join(found[name])}; "
                "an image pairs with its mask by name: rename or remove all but one",
            )
        )
    return {name: paths[0] for name, paths in found.items() if name not in duplicates}, duplicates


def _match(images: str | os.PathLike, masks: str | os.PathLike) -> _Matching:
    problems: list[Problem] = []
    image_files, image_duplicates = _by_name(Path(images), problems)
    mask_files, mask_duplicates = _by_name(Path(masks), problems)
    pairs = tuple(Pair(n, image_files[n], mask_files[n]) for n in sorted(image_files) if n in mask_files)
    return _Matching(
        pairs=pairs,
        unmatched_images=tuple(sorted(set(image_files) - set(mask_files) - mask_duplicates)),
        unmatched_masks=tuple(sorted(set(mask_files) - set(image_files) - image_duplicates)),
        problems=tuple(problems),
    )


def _shown(values: Sequence) -> str:
    """The first :data:`NAMES_SHOWN` values, then how many there are in all."""
    text = ", ".join(str(v) for v in values[:NAMES_SHOWN])
    return text + (f" ... ({len(values)} in all)" if len(values) > NAMES_SHOWN else "")


def _unmatched_problems(
    matching: _Matching, images: str | os.PathLike, masks: str | os.PathLike
) -> list[Problem]:
    problems = []
    if matching.unmatched_images:
        problems.append(
            Problem(
                str(images),
                f"{len(matching.unmatched_images)} image(s) have no mask of the same name in {masks}: "
                f"{_shown(matching.unmatched_images)}",
            )
        )
    if matching.unmatched_masks:
        problems.append(
            Problem(
                str(masks),
                f"{len(matching.unmatched_masks)} mask(s) have no image of the same name in {images}: "
                f"{_shown(matching.unmatched_masks)}",
            )
        )
    return problems


def discover_pairs(images: str | os.PathLike, masks: str | os.PathLike) -> tuple[Pair, ...]:
    """Pair the images of ``images`` with the masks of ``masks`` by name (see the module docstring).

    Args:
        images: the folder of images (searched recursively).
        masks: the folder of masks.

    Returns:
        The pairs, sorted by name. Raises :class:`DataError` when a folder is missing or holds no
        images, holds files that are not images, holds two files of one name (both named), or when
        a name is found on one side only (the folder and the first few names are named).
    """
    matching = _match(images, masks)
    problems = [*matching.problems, *_unmatched_problems(matching, images, masks)]
    if problems:
        raise DataError(
            f"cannot pair the images of {images} with the masks of {masks}:\n{format_problems(problems)}"
        )
    return matching.pairs


# ------------------------------------------------------------------------------------------------
# Checking pairs


def _header(path: str, problems: list[Problem]) -> ImageInfo | None:
    try:
        return read_info(path)
    except DataError as e:
        problems.append(Problem(path, getattr(e, "reason", str(e))))
        return None


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _same_spacing(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=SPACING_TOLERANCE) for x, y in zip(a, b))


def _geometry_problems(pair: Pair, image: ImageInfo, mask: ImageInfo) -> list[Problem]:
    if mask.shape != image.shape:
        return [
            Problem(
                pair.mask,
                f"spatial shape {_shape(mask.shape)} ({mask.spatial_dims}D) differs from "
                f"{_shape(image.shape)} ({image.spatial_dims}D) of its image {pair.image}",
            )
        ]
    measured = image.format not in NO_SPACING_FORMATS and mask.format not in NO_SPACING_FORMATS
    if measured and not _same_spacing(image.spacing, mask.spacing):
        return [
            Problem(
                pair.mask,
                f"spacing {_vec(mask.spacing)} differs from {_vec(image.spacing)} of its image "
                f"{pair.image} (x, y[, z]; relative tolerance {SPACING_TOLERANCE:g})",
            )
        ]
    return []


def _labels_of(path: str, array: np.ndarray, problems: list[Problem]) -> MaskLabels | None:
    """The label values of a mask's pixels, or None with a problem when they are not labels."""
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        fractional = array[array != np.round(array)]
        if fractional.size:
            problems.append(
                Problem(
                    path,
                    f"holds non-integer values ({fractional.size} voxel(s), e.g. {float(fractional[0]):g}); "
                    "a mask holds class indices 0 (background), 1, 2 ... (was it resampled linearly?)",
                )
            )
            return None
    values, counts = np.unique(array, return_counts=True)
    if values[0] < 0:
        negative = [int(v) for v in values if v < 0]
        problems.append(
            Problem(path, f"holds negative label(s) {_shown(negative)}; labels are 0 (background), 1, 2 ...")
        )
        return None
    return MaskLabels(tuple(int(v) for v in values), tuple(int(c) for c in counts))


def _read_labels(path: str, problems: list[Problem]) -> MaskLabels | None:
    try:
        array = np.asarray(read_image(path).array)
    except DataError as e:
        problems.append(Problem(path, getattr(e, "reason", str(e))))
        return None
    return _labels_of(path, array, problems)


def _check_pair(pair: Pair) -> PairRecord:
    """Both headers, the geometry, and the mask's pixels of one pair."""
    problems: list[Problem] = []
    image_info = _header(pair.image, problems)
    mask_info = _header(pair.mask, problems)
    geometry = []
    labels = None
    if image_info is not None and mask_info is not None:
        geometry = _geometry_problems(pair, image_info, mask_info)
    if mask_info is not None and mask_info.channels != 1:
        problems.append(
            Problem(
                pair.mask,
                f"has {mask_info.channels} channels; a mask is one label map of class indices "
                "(0 background, 1, 2 ... the classes), not one channel per class or a colour picture",
            )
        )
    elif mask_info is not None:
        labels = _read_labels(pair.mask, problems)
    return PairRecord(pair, image_info, mask_info, labels, tuple(geometry), tuple(problems))


def _scan(pairs: Sequence[Pair], progress: bool) -> list[PairRecord]:
    return [_check_pair(p) for p in tqdm(pairs, desc="checking pairs", unit="pair", disable=not progress)]


def _image_consistency(records: Sequence[PairRecord]) -> list[Problem]:
    """Images whose spatial dims or channels differ from the majority's."""
    files = [FileRecord(Sample(r.pair.image, r.pair.name, None), r.image_info) for r in records]
    return consistency_problems([f for f in files if f.info is not None])


def _label_problems(
    records: Sequence[PairRecord], num_classes: int | None, allow_empty: bool
) -> list[Problem]:
    """Masks with a label >= ``num_classes`` (when given) and, unless ``allow_empty``, empty masks."""
    problems = []
    for record in records:
        labels = record.labels
        if labels is None:
            continue
        high = [v for v in labels.values if num_classes is not None and v >= num_classes]
        if high:
            problems.append(
                Problem(
                    record.pair.mask,
                    f"holds label(s) {_shown(high)} but num_classes is {num_classes} "
                    f"(labels 0..{num_classes - 1}, background included)",
                )
            )
        if not allow_empty and labels.empty:
            problems.append(
                Problem(
                    record.pair.mask,
                    "is empty: every voxel is background (0); remove the pair or allow empty masks",
                )
            )
    return problems


def _label_values(records: Sequence[PairRecord]) -> tuple[int, ...]:
    return tuple(sorted({v for r in records if r.labels is not None for v in r.labels.values}))


def _gap_note(values: Sequence[int]) -> str | None:
    """What is odd about labels read from the masks when some below the largest are missing."""
    if not values:
        return None
    missing = sorted(set(range(1, max(values))) - set(values))  # background may be absent
    if not missing:
        return None
    return (
        f"labels found: {_shown(list(values))}; label(s) {_shown(missing)} appear in no mask, so "
        f"num_classes read from the masks would be {max(values) + 1} with classes never seen "
        "(binary masks saved as 0/255? map 255 to 1)"
    )


def _check_num_classes(num_classes: int | None) -> None:
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
    ):
        raise ValueError(f"num_classes must be an integer >= 2 (background included); got {num_classes!r}")


# ------------------------------------------------------------------------------------------------
# Joint transforms


def _mask_step(step: Transform) -> Transform | None:
    """The mask's version of one step of an image pipeline (None: the image's alone)."""
    if isinstance(step, NormalizeIntensity):
        return None
    if isinstance(step, Resample):
        return Resample(step.spacing, mode=MASK_INTERPOLATION)
    if isinstance(step, Resize):
        return Resize(step.size, mode=MASK_INTERPOLATION)
    if isinstance(step, CropOrPad):
        return CropOrPad(step.size, random=step.random, pad_value=MASK_PAD_VALUE)
    if isinstance(step, RandomFlip):
        return step
    raise TypeError(
        f"no mask counterpart for the transform {step!r}; known: NormalizeIntensity (image only), "
        "Resample, Resize, CropOrPad, RandomFlip"
    )


class PairedTransform:
    """Transform an image and its mask alike, with one draw of randomness.

    Each step is a pair (image step, mask step or None). Before a step the generator's state is
    copied: the image step draws from the generator, the mask step from the copy, so both see the
    same numbers (crop offsets, flips); afterwards the generator has advanced once.

    Args:
        steps: (image transform, its mask counterpart or None for image-only steps) in order.
    """

    def __init__(self, steps: Sequence[tuple[Transform, Transform | None]]):
        self.steps = list(steps)

    @classmethod
    def from_image_transform(cls, transform: Compose | Transform) -> PairedTransform:
        """The paired version of an image pipeline (e.g. :func:`build_transform`'s): intensity
        normalisation for the image only; resampling and resizing by nearest neighbour, padding
        with background (0), the same crops and flips for the mask. Raises ``TypeError`` for a
        step it does not know."""
        steps = transform.transforms if isinstance(transform, Compose) else [transform]
        return cls([(step, _mask_step(step)) for step in steps])

    def __call__(
        self, image: MedicalImage, mask: MedicalImage, rng: np.random.Generator
    ) -> tuple[MedicalImage, MedicalImage]:
        """Transformed (image, mask); both must start on the same grid."""
        for image_step, mask_step in self.steps:
            mask_rng = copy.deepcopy(rng) if mask_step is not None else None
            image = image_step(image, rng)
            if mask_step is not None:
                mask = mask_step(mask, mask_rng)
        return image, mask

    def __repr__(self) -> str:
        return f"PairedTransform({self.steps!r})"


def build_paired_transform(
    data: DataConfig, training: bool = False, crop: Sequence[int] | None = None
) -> PairedTransform:
    """The paired transform a :class:`DataConfig` describes (see :func:`build_transform`).

    Args:
        data: normalisation, ``spacing``, ``resize``, ``crop``, ``flip_axes``.
        training: crop at random offsets and flip ``data.flip_axes`` at random; otherwise centre
            crop and no flips (``data.random_crop`` is not consulted: training decides).
        crop: the crop size, in place of ``data.crop``.
    """
    crop = tuple(crop) if crop is not None else data.crop
    flips = data.flip_axes if training else ()
    image_transform = build_transform(data.replace(crop=crop, random_crop=training, flip_axes=flips))
    return PairedTransform.from_image_transform(image_transform)


def _as_labels(array) -> torch.Tensor:
    """A (1, *spatial) label map as a long tensor (*spatial)."""
    return as_float_tensor(array)[0].round().long().contiguous()


# ------------------------------------------------------------------------------------------------
# The dataset


class PairedDataset(Dataset):
    """Image/mask pairs of two folders (see the module docstring), checked when opened, read lazily.

    Each item is a dict: ``image`` (float32 tensor ``(C, *spatial)``, normalised as ``data`` says),
    ``mask`` (int64 tensor ``(*spatial)`` of class indices), ``path`` and ``mask_path`` (the
    files) and ``index``. Opening reads every header and every mask's pixels (for the labels);
    images are decoded only when an item is asked for. Every problem found is named by its file
    in one :class:`DataError` (or, with ``data.skip_bad``, its pair is left out with a warning).

    Random transforms draw from ``numpy.random.default_rng([data.seed, epoch, index])``, the same
    for image and mask; call :meth:`set_epoch` to vary them from epoch to epoch.

    Args:
        images: the folder of images.
        masks: the folder of masks, matched by name.
        data: how files become tensors (default :class:`DataConfig`); ``data.labels`` is not used.
        num_classes: classes, background included; None: the largest label + 1 over all masks
            (then a label missing below the largest is an error: give ``num_classes`` to accept).
        training: random crops and flips (see :func:`build_paired_transform`); without
            ``data.crop`` the crop is the size of the first pair once resampled and resized, so
            that items batch.
        allow_empty: accept masks that are all background.
        progress: a progress bar while checking.
    """

    def __init__(
        self,
        images: str | os.PathLike,
        masks: str | os.PathLike,
        data: DataConfig | None = None,
        num_classes: int | None = None,
        training: bool = False,
        allow_empty: bool = True,
        progress: bool = False,
    ):
        _check_num_classes(num_classes)
        self.images_root, self.masks_root = str(images), str(masks)
        self.data = data if data is not None else DataConfig()
        self.training = bool(training)
        self.seed = self.data.seed
        self.epoch = 0
        matching = _match(images, masks)
        records = _scan(matching.pairs, progress)
        problems = [*matching.problems, *_unmatched_problems(matching, images, masks)]
        problems += [p for r in records for p in (*r.geometry, *r.problems)]
        problems += _image_consistency(records)
        problems += _label_problems(records, num_classes, allow_empty)
        self._handle_problems(problems)
        bad = {p.path for p in problems}
        self.records = tuple(r for r in records if r.pair.image not in bad and r.pair.mask not in bad)
        if not self.records:
            raise DataError(
                f"{self.images_root}: no usable pairs left after leaving out {len(bad)} bad file(s)"
            )
        self.num_classes = num_classes if num_classes is not None else self._num_classes_from_masks()
        self.info: ImageInfo = self.records[0].image_info
        self._check_config()
        self.crop = self.data.crop
        if self.training and self.crop is None:
            self.transform = build_paired_transform(self.data)
            self.crop = self.transformed(0)[0].spatial_shape
        self.transform = build_paired_transform(self.data, training=self.training, crop=self.crop)

    def _handle_problems(self, problems: list[Problem]) -> None:
        if not problems:
            return
        listing = format_problems(problems)
        where = f"{self.images_root} and {self.masks_root}"
        if not self.data.skip_bad:
            raise DataError(
                f"{where}: {len(problems)} problem(s) found:\n{listing}\n"
                "Fix them, or set skip_bad=True in the data config to leave those pairs out."
            )
        warnings.warn(
            f"{where}: leaving out the pairs of {len(problems)} problem(s):\n{listing}", stacklevel=3
        )

    def _num_classes_from_masks(self) -> int:
        values = _label_values(self.records)
        note = _gap_note(values)
        if note is not None:
            raise DataError(f"{self.masks_root}: {note}; or give num_classes={max(values) + 1} to keep them")
        if max(values, default=0) == 0:
            raise DataError(
                f"{self.masks_root}: every mask is empty (background, 0, only): nothing to segment"
            )
        return max(values) + 1

    def _check_config(self) -> None:
        dims = self.spatial_dims
        for name in ("spacing", "resize", "crop"):
            value = getattr(self.data, name)
            if value is not None and len(value) != dims:
                raise ValueError(
                    f"data.{name} has {len(value)} values, but {self.images_root} holds {dims}D images"
                )
        if any(axis >= dims for axis in self.data.flip_axes):
            raise ValueError(
                f"data.flip_axes {list(self.data.flip_axes)} must be axes of {dims}D images (0..{dims - 1})"
            )

    @property
    def pairs(self) -> tuple[Pair, ...]:
        return tuple(r.pair for r in self.records)

    @property
    def samples(self) -> tuple[Pair, ...]:
        """The pairs (each names its image as ``path``), as the training loop's messages expect."""
        return self.pairs

    @property
    def spatial_dims(self) -> int:
        return self.info.spatial_dims

    @property
    def channels(self) -> int:
        return self.info.channels

    @property
    def label_values(self) -> tuple[int, ...]:
        """Every label value found in the masks, ascending."""
        return _label_values(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Vary the random transforms from epoch to epoch (deterministically)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def read(self, index: int) -> tuple[MedicalImage, MedicalImage]:
        """The raw image and mask of pair ``index`` (no transform); the mask has its image's
        geometry. Raises :class:`DataError` naming the files when they disagree with the dataset."""
        pair = self.records[index].pair
        image, mask = read_image(pair.image), read_image(pair.mask)
        if image.spatial_dims != self.spatial_dims or image.channels != self.channels:
            raise DataError(
                f"{pair.image}: {image.spatial_dims}D with {image.channels} channel(s), but the dataset is "
                f"{self.spatial_dims}D with {self.channels}"
            )
        if mask.spatial_shape != image.spatial_shape or mask.channels != 1:
            raise DataError(
                f"{pair.mask}: pixels of shape {tuple(mask.array.shape)} do not fit its image {pair.image} "
                f"of shape {tuple(image.array.shape)}"
            )
        mask = mask.replace(spacing=image.spacing, origin=image.origin, direction=image.direction)
        return image, mask

    def transformed(self, index: int) -> tuple[MedicalImage, MedicalImage]:
        """Image and mask of pair ``index`` after the transforms, with their geometry."""
        image, mask = self.read(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return self.transform(image, mask, rng)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        index = index % len(self)
        image, mask = self.transformed(index)
        pair = self.records[index].pair
        return {
            "image": as_float_tensor(image.array).contiguous(),
            "mask": _as_labels(mask.array),
            "path": pair.image,
            "mask_path": pair.mask,
            "index": index,
        }


class PairedSubset(Dataset):
    """Some items of a :class:`PairedDataset`, in a given order, with the same interface.

    ``pairs`` and item ``index`` refer to positions in the subset; random transforms still draw
    from the parent's ``(seed, epoch, parent index)``.
    """

    def __init__(self, dataset: PairedDataset, indices: Sequence[int]):
        if any(not 0 <= i < len(dataset) for i in indices):
            raise IndexError(f"subset indices must lie in [0, {len(dataset)})")
        self.dataset = dataset
        self.indices = tuple(int(i) for i in indices)
        self.pairs = tuple(dataset.pairs[i] for i in self.indices)

    samples = property(lambda self: self.pairs)
    spatial_dims = property(lambda self: self.dataset.spatial_dims)
    channels = property(lambda self: self.dataset.channels)
    num_classes = property(lambda self: self.dataset.num_classes)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def transformed(self, index: int) -> tuple[MedicalImage, MedicalImage]:
        return self.dataset.transformed(self.indices[index])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[self.indices[index]]
        return {**item, "index": index % len(self)}


def write_prediction(
    dataset: PairedDataset | PairedSubset,
    index: int,
    labels: torch.Tensor | np.ndarray,
    folder: str | os.PathLike,
) -> Path:
    """Write a label map predicted for item ``index`` with the geometry of its transformed image.

    Args:
        dataset: where the item comes from (open it with ``training=False`` so that items are
            the same at every read).
        index: the item.
        labels: class indices ``(*spatial)``, the item's spatial shape.
        folder: where to write. The file is named as the pair (its relative path), in the mask's
            format where it can be written, else NIfTI (``.nii.gz``) for volumes, PNG for 2D.

    Returns:
        The written path.
    """
    image, _ = dataset.transformed(index)
    array = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if tuple(array.shape) != image.spatial_shape:
        raise ValueError(
            f"labels must have the item's spatial shape {image.spatial_shape}; got {array.shape}"
        )
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ValueError(f"labels must be integer class indices; got {array.dtype}")
    top = np.iinfo(np.uint16).max
    if array.size and (array.min() < 0 or array.max() > top):
        raise ValueError(f"labels must lie in 0..{top}; got {array.min()}..{array.max()}")
    pair = dataset.pairs[index]
    suffix = full_suffix(pair.mask)
    if suffix not in WRITABLE_SUFFIXES or Path(pair.mask).is_dir():
        suffix = ".nii.gz" if image.spatial_dims == 3 else ".png"
    dtype = np.uint8 if array.max(initial=0) <= np.iinfo(np.uint8).max else np.uint16
    path = inside(folder, pair.name + suffix)
    prediction = image.replace(array=np.ascontiguousarray(array.astype(dtype)[None]), path=str(path))
    return write_image(path, prediction)


# ------------------------------------------------------------------------------------------------
# Inspection


@dataclass(frozen=True)
class PairReport:
    """What :func:`inspect_pairs` found; nothing in it was raised.

    Attributes:
        images, masks: the folders.
        records: every pair as checked.
        unmatched_images: names of images without a mask; ``unmatched_masks`` the reverse.
        problems: files that cannot be used (other than geometry): not images, duplicate names,
            unreadable files, masks with several channels, non-integer or negative values, labels
            >= a given ``num_classes``, images of another kind than the rest.
        num_classes: given, or the largest label + 1 (None: no mask could be read).
        notes: what is odd without being wrong (labels missing below the largest ...).
    """

    images: str
    masks: str
    records: tuple[PairRecord, ...]
    unmatched_images: tuple[str, ...]
    unmatched_masks: tuple[str, ...]
    problems: tuple[Problem, ...]
    num_classes: int | None
    notes: tuple[str, ...] = ()

    @property
    def pairs(self) -> tuple[Pair, ...]:
        return tuple(r.pair for r in self.records)

    @property
    def geometry(self) -> tuple[Problem, ...]:
        """Masks whose shape or spacing differs from their image's (each names both files)."""
        return tuple(p for r in self.records for p in r.geometry)

    @property
    def label_values(self) -> tuple[int, ...]:
        return _label_values(self.records)

    @property
    def class_voxels(self) -> dict[int, int]:
        """Voxels of each class (every class below ``num_classes`` and every label found) over all
        masks read."""
        voxels = dict.fromkeys(range(self.num_classes or 0), 0)
        for record in self.records:
            if record.labels is not None:
                for value, count in zip(record.labels.values, record.labels.counts):
                    voxels[value] = voxels.get(value, 0) + count
        return dict(sorted(voxels.items()))

    @property
    def class_fractions(self) -> dict[int, float]:
        """Each class's share of all voxels of all masks read (summing to 1)."""
        voxels = self.class_voxels
        total = sum(voxels.values())
        return {k: v / total for k, v in voxels.items()} if total else {}

    @property
    def empty_masks(self) -> tuple[str, ...]:
        """Masks that are all background."""
        return tuple(r.pair.mask for r in self.records if r.labels is not None and r.labels.empty)

    @property
    def usable(self) -> bool:
        """At least one pair, every name matched, no problem and no geometry problem."""
        return bool(self.records) and not (
            self.unmatched_images or self.unmatched_masks or self.problems or self.geometry
        )

    def summary(self) -> dict:
        """Machine-readable summary (class keys are ints; JSON makes them strings)."""

        def listed(problems):
            return [{"path": p.path, "message": p.message} for p in problems]

        return {
            "images": self.images,
            "masks": self.masks,
            "usable": self.usable,
            "pairs": len(self.records),
            "unmatched_images": list(self.unmatched_images),
            "unmatched_masks": list(self.unmatched_masks),
            "num_classes": self.num_classes,
            "label_values": list(self.label_values),
            "class_fractions": self.class_fractions,
            "empty_masks": list(self.empty_masks),
            "geometry_problems": listed(self.geometry),
            "problems": listed(self.problems),
            "notes": list(self.notes),
        }

    def format(self) -> str:
        """The human-readable report."""
        s = self.summary()
        lines = [f"Pairs of images {s['images']}", f"     with masks {s['masks']}"]
        lines.append(f"  pairs          {s['pairs']}")
        if self.unmatched_images:
            lines.append(
                f"  images without a mask: {len(self.unmatched_images)}: {_shown(self.unmatched_images)}"
            )
        if self.unmatched_masks:
            lines.append(
                f"  masks without an image: {len(self.unmatched_masks)}: {_shown(self.unmatched_masks)}"
            )
        classes = s["num_classes"] if s["num_classes"] is not None else "-"
        lines.append(f"  classes        {classes} (background included)")
        lines.append(f"  labels found   {', '.join(str(v) for v in s['label_values']) or '-'}")
        fractions = "  ".join(f"{k}: {100 * f:.3g}%" for k, f in s["class_fractions"].items())
        lines.append(f"  voxels         {fractions or '-'}")
        if self.empty_masks:
            lines.append(f"  empty masks    {len(self.empty_masks)} (all background)")
            lines.extend(f"    - {path}" for path in self.empty_masks)
        for title, problems in (("geometry problems", self.geometry), ("problems", self.problems)):
            if problems:
                lines.append(f"  {title}: {len(problems)}")
                lines.extend(f"    - {p}" for p in problems)
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.append("  usable: yes" if self.usable else "  usable: NO (see above)")
        return "\n".join(lines)


def inspect_pairs(
    images: str | os.PathLike,
    masks: str | os.PathLike,
    num_classes: int | None = None,
    progress: bool = False,
) -> PairReport:
    """Pair, read and check every image/mask pair, collecting what is wrong instead of raising.

    Args:
        images: the folder of images.
        masks: the folder of masks.
        num_classes: classes, background included; labels at or above it are problems. None: read
            from the masks (largest label + 1).
        progress: a progress bar.

    Returns:
        The :class:`PairReport`; raises :class:`DataError` only when a folder itself is unusable
        (missing, or holding no images at all).
    """
    _check_num_classes(num_classes)
    matching = _match(images, masks)
    records = _scan(matching.pairs, progress)
    problems = list(matching.problems)
    problems += [p for r in records for p in r.problems]
    problems += _image_consistency(records)
    problems += _label_problems(records, num_classes, allow_empty=True)
    values = _label_values(records)
    notes = []
    if num_classes is None:
        note = _gap_note(values)
        notes += [note] if note is not None else []
        num_classes = max(values) + 1 if values else None
    if records and all(r.labels is not None and r.labels.empty for r in records):
        notes.append("every mask is empty (background only): nothing to segment")
    return PairReport(
        images=str(images),
        masks=str(masks),
        records=tuple(records),
        unmatched_images=matching.unmatched_images,
        unmatched_masks=matching.unmatched_masks,
        problems=tuple(problems),
        num_classes=num_classes,
        notes=tuple(notes),
    )
