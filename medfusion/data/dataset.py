"""The dataset of a folder of medical images or volumes, streamed lazily item by item."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset

from medfusion.config import DataConfig
from medfusion.data.discovery import Sample, discover
from medfusion.data.errors import DataError, Problem, format_problems
from medfusion.data.image import ImageInfo, MedicalImage
from medfusion.data.inspect import FileRecord, consistency_problems, scan
from medfusion.data.names import check_class_names
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

VALIDATE_MODES = ("none", "header", "full")


def build_transform(config: DataConfig) -> Compose:
    """The transform pipeline a :class:`DataConfig` describes.

    Order: normalise to [-1, 1], resample to ``spacing``, ``resize``, ``crop`` (centre or random,
    padding with -1), random flips.
    """
    steps: list[Transform] = [
        NormalizeIntensity(
            config.normalization,
            percentiles=config.percentiles,
            window=config.window,
            per_channel=config.per_channel,
            bounds=config.bounds,
            class_bounds=config.class_bounds,
        )
    ]
    if config.spacing is not None:
        steps.append(Resample(config.spacing))
    if config.resize is not None:
        steps.append(Resize(config.resize))
    if config.crop is not None:
        steps.append(CropOrPad(config.crop, random=config.random_crop))
    if config.flip_axes:
        steps.append(RandomFlip(config.flip_axes))
    return Compose(steps)


class ImageFolderDataset(Dataset):
    """Samples of a folder (see :mod:`medfusion.data.discovery` for the layout), read lazily.

    Each item is a dict: ``image`` (float32 tensor ``(C, *spatial)``), ``label`` (class index, or
    -1 when unlabelled) and ``index``. Files are read only when an item is asked for, so a folder
    of 100,000 files opens in the time it takes to list it; with ``validate="header"`` every
    header is read once up front (shapes, channels), ``"full"`` also decodes every file.

    Random transforms draw from ``numpy.random.default_rng([seed, epoch, index])``: an item is the
    same whatever the worker that loads it; call :meth:`set_epoch` before iterating over an epoch
    to vary augmentation (with ``persistent_workers=True`` the workers keep the epoch they started
    with).

    Args:
        root: the dataset folder.
        labels: ``None``/``"folders"``, ``"none"`` or a ``path,label`` CSV.
        transform: applied to each :class:`MedicalImage`; default: intensity normalisation.
        class_names: fix the class order (e.g. that of a trained model, or one read with
            :func:`~medfusion.data.discovery.load_class_names`); labels outside it are errors.
            Default: sorted names found. Each must be a valid class name
            (:func:`~medfusion.data.names.check_class_name`).
        skip_bad: leave out bad files with a warning rather than raising; files that only fail
            when read (truncated pixels) are replaced by the next readable item.
        validate: ``none``, ``header`` or ``full`` (see above). ``skip_bad`` implies at least
            ``header``.
        seed: seed of the random transforms.
        progress: show a progress bar while validating.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        labels: str | os.PathLike | None = None,
        transform: Transform | None = None,
        class_names: Sequence[str] | None = None,
        skip_bad: bool = False,
        validate: str = "none",
        seed: int = 0,
        progress: bool = False,
    ):
        if validate not in VALIDATE_MODES:
            raise ValueError(f"validate must be one of {VALIDATE_MODES}; got {validate!r}")
        if skip_bad and validate == "none":
            validate = "header"
        self.root = str(root)
        self.skip_bad = skip_bad
        self.seed = int(seed)
        self.epoch = 0
        self.transform = transform if transform is not None else NormalizeIntensity("auto")
        discovery = discover(root, labels)
        self.label_source = discovery.label_source
        if class_names is not None:
            class_names = check_class_names(class_names, "class_names")
        self.class_names = tuple(class_names) if class_names is not None else discovery.class_names
        problems = list(discovery.problems)
        problems += self._unknown_label_problems(discovery.samples)
        listed_bad = {p.path for p in problems}
        samples = [s for s in discovery.samples if s.path not in listed_bad]
        records = None
        if validate != "none":
            records = scan(samples, read_pixels=validate == "full", progress=progress, desc="checking files")
            problems += [Problem(r.sample.path, r.problem) for r in records if r.problem is not None]
            problems += consistency_problems(records)
        self._handle_problems(problems)
        bad = {p.path for p in problems}
        self.samples: tuple[Sample, ...] = tuple(s for s in samples if s.path not in bad)
        if not self.samples:
            raise DataError(f"{self.root}: no usable images left after leaving out {len(bad)} bad file(s)")
        self.problems = tuple(problems)
        self.info = self._reference_info(records, bad)
        # every good file's header when they were read (validate "header" or "full"), else None
        self.headers: tuple[ImageInfo, ...] | None = None
        if records is not None:
            self.headers = tuple(r.info for r in records if r.info is not None and r.sample.path not in bad)
        self._class_index = {name: i for i, name in enumerate(self.class_names)}
        self._warned: set[str] = set()

    def _unknown_label_problems(self, samples: Sequence[Sample]) -> list[Problem]:
        known = set(self.class_names)
        return [
            Problem(s.path, f"label {s.label!r} is not one of the classes {list(self.class_names)}")
            for s in samples
            if s.label is not None and s.label not in known
        ]

    def _handle_problems(self, problems: list[Problem]) -> None:
        if not problems:
            return
        listing = format_problems(problems)
        if not self.skip_bad:
            raise DataError(
                f"{self.root}: {len(problems)} problem(s) found:\n{listing}\n"
                "Fix them, or pass --skip-bad (skip_bad=True) to leave those files out."
            )
        warnings.warn(f"{self.root}: leaving out {len(problems)} bad file(s):\n{listing}", stacklevel=3)

    def _reference_info(self, records: list[FileRecord] | None, bad: set[str]) -> ImageInfo:
        """Header of the first good sample: the spatial dims and channels every item must match."""
        if records is not None:
            for record in records:
                if record.info is not None and record.sample.path not in bad:
                    return record.info
        try:
            return read_info(self.samples[0].path)
        except DataError as e:
            raise DataError(f"{self.root}: the first image cannot be read: {e}") from e

    @property
    def spatial_dims(self) -> int:
        return self.info.spatial_dims

    @property
    def channels(self) -> int:
        return self.info.channels

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> list[int]:
        """Class index of every sample (-1 when unlabelled), without reading any file."""
        return [self._label_index(s) for s in self.samples]

    def _label_index(self, sample: Sample) -> int:
        return -1 if sample.label is None else self._class_index[sample.label]

    def set_epoch(self, epoch: int) -> None:
        """Vary the random transforms from epoch to epoch (deterministically)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> MedicalImage:
        """The raw image of item ``index`` (no transform), checked against the dataset."""
        sample = self.samples[index]
        image = read_image(sample.path)
        if image.spatial_dims != self.spatial_dims or image.channels != self.channels:
            raise DataError(
                f"{sample.path}: {image.spatial_dims}D with {image.channels} channel(s), but the "
                f"dataset is {self.spatial_dims}D with {self.channels} (mixed files; run "
                "`medfusion data inspect` to list them)"
            )
        return image.replace(label=sample.label)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index = index % len(self)
        attempts = len(self) if self.skip_bad else 1
        for offset in range(attempts):
            current = (index + offset) % len(self)
            try:
                image = self.read(current)
                break
            except DataError as e:
                if not self.skip_bad:
                    raise
                if self.samples[current].path not in self._warned:
                    self._warned.add(self.samples[current].path)
                    warnings.warn(f"skipping unreadable file: {e}", stacklevel=2)
        else:
            raise DataError(f"{self.root}: no readable image left (all {len(self)} failed)")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image = self.transform(image, rng)
        tensor = as_float_tensor(image.array)
        return {
            "image": tensor.contiguous(),
            "label": self._label_index(self.samples[current]),
            "index": index,
        }


def open_alike(
    folders: Mapping[str, str | os.PathLike], data: DataConfig, names: Mapping[str, str] | None = None
) -> tuple[dict[str, ImageFolderDataset], tuple[int, ...]]:
    """Open folders to be compared or trained on together, all the same way.

    The first folder is the reference: ``data.labels`` (a CSV) applies to it, the others take their
    classes from first-level subfolders. Each must hold at least 2 images of the reference's kind
    (2D/3D, channels), and all get one transform: ``data``, resized to ``data.resize`` or else to
    the size of the reference's first image. Headers are read once, when the folders open.

    Args:
        folders: the folders by name, the reference first.
        data: how files become tensors.
        names: how errors name each folder (default: its key), e.g. a command-line option.
    Returns:
        The datasets by name and the image size.
    """
    names = dict(names or {})
    where = {key: f"{names.get(key, key)} {folder}" for key, folder in folders.items()}
    first = next(iter(folders))
    datasets = {
        key: ImageFolderDataset(
            folder,
            labels=data.labels if key == first else None,
            transform=build_transform(data),
            skip_bad=data.skip_bad,
            validate="header",
        )
        for key, folder in folders.items()
    }
    reference = datasets[first]
    for key, dataset in datasets.items():
        if len(dataset) < 2:
            raise ValueError(f"{where[key]}: needs at least 2 images; found {len(dataset)}")
        if (dataset.spatial_dims, dataset.channels) != (reference.spatial_dims, reference.channels):
            raise ValueError(
                f"{where[key]}: {dataset.spatial_dims}D images with {dataset.channels} channel(s), but "
                f"{where[first]} holds {reference.spatial_dims}D with {reference.channels}; "
                "compare like with like"
            )
    size = tuple(data.resize or reference[0]["image"].shape[1:])
    transform = build_transform(data.replace(resize=size))
    for dataset in datasets.values():
        dataset.transform = transform
    return datasets, size


class DatasetSubset(Dataset):
    """Some items of an :class:`ImageFolderDataset`, in a given order, with the same interface.

    ``samples``, ``labels`` and item ``index`` refer to positions in the subset; random transforms
    still draw from the parent's ``(seed, epoch, parent index)``.
    """

    def __init__(self, dataset: ImageFolderDataset, indices: Sequence[int]):
        if any(not 0 <= i < len(dataset) for i in indices):
            raise IndexError(f"subset indices must lie in [0, {len(dataset)})")
        self.dataset = dataset
        self.indices = tuple(int(i) for i in indices)
        self.samples = tuple(dataset.samples[i] for i in self.indices)
        self.root = dataset.root
        self.class_names = dataset.class_names

    spatial_dims = property(lambda self: self.dataset.spatial_dims)
    channels = property(lambda self: self.dataset.channels)
    num_classes = property(lambda self: self.dataset.num_classes)
    info = property(lambda self: self.dataset.info)

    @property
    def labels(self) -> list[int]:
        labels = self.dataset.labels
        return [labels[i] for i in self.indices]

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[self.indices[index]]
        return {**item, "index": index % len(self)}


def split_indices(labels: Sequence[int], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split item indices into (kept, held out), holding out ``fraction`` of every class.

    Each class with at least two items keeps at least one and holds out at least one; the choice
    is random but fixed by ``seed``. Both lists are sorted.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be between 0 and 1; got {fraction}")
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for label in sorted(set(labels)):
        members = [i for i, x in enumerate(labels) if x == label]
        if len(members) < 2:
            continue
        count = min(max(1, round(fraction * len(members))), len(members) - 1)
        held += [members[i] for i in rng.permutation(len(members))[:count]]
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], sorted(held)
