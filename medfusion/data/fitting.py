"""What a training run learns from its data before training: the intensity normalisation of the
whole dataset, and the geometry (voxel spacing, direction) its images have once transformed.

Both are written into what the run leaves behind (the resolved ``config.yaml``, the model folder's
``medfusion.json``), so that generated images go back to the training data's units and geometry:

- :func:`fit_normalization` turns ``auto`` into the mode it stands for on this dataset (``dtype``
  for 8-bit files, ``window`` for CT, ``dataset`` otherwise) and fits ``dataset``'s ``bounds``:
  the ``percentiles`` of the values of the training files, per channel, read from an even spread
  of at most ``max_files`` files (and with ``fit_per_class`` each class's own, ``class_bounds``).
  Every image (of a class) is then mapped alike, and the inverse (see
  :func:`medfusion.data.writers.intensity_mapping`) gives values in the files' own units.
- :func:`training_geometry` is the spacing and direction of a transformed image, and warns when
  the files' spacings differ while no ``spacing`` resamples them alike.
"""

from __future__ import annotations

import statistics
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from medfusion.config import DataConfig
from medfusion.data.image import MedicalImage
from medfusion.data.transforms import NormalizeIntensity, _quantile

FIT_FILES = 256  # files read to fit the bounds at most (an even spread over the dataset)
VALUES_PER_FILE = 1 << 16  # values kept of each file at most (a random subsample of its voxels)


def fit_normalization(
    dataset, config: DataConfig, max_files: int = FIT_FILES, progress: bool = False
) -> DataConfig:
    """``config`` with its normalisation resolved for ``dataset`` (see the module docstring).

    Args:
        dataset: a :class:`~medfusion.data.dataset.ImageFolderDataset` (its files are read raw,
            through ``dataset.read``).
        config: the data config; modes other than ``auto`` and ``dataset`` come back unchanged,
            and so do fitted ``bounds`` (after checking them against the channels).
        max_files: files read at most.
        progress: a progress bar while reading.

    Returns:
        The config with ``normalization`` in ``dtype``, ``window`` or ``dataset`` (with ``bounds``).
    """
    if config.normalization not in ("auto", "dataset"):
        return config
    if max_files < 1:
        raise ValueError(f"max_files must be >= 1; got {max_files}")
    if config.bounds is not None:
        if len(config.bounds) not in (1, dataset.channels):
            raise ValueError(
                f"bounds hold {len(config.bounds)} (low, high) pairs; {dataset.root} has "
                f"{dataset.channels} channel(s)"
            )
        return config.replace(normalization="dataset")
    if config.normalization == "auto" and not config.fit_per_class:  # per class: always 'dataset'
        mode = NormalizeIntensity("auto", window=config.window).resolve_mode(dataset.read(0))
        if mode in ("dtype", "window"):
            return config.replace(normalization=mode)
    labels = dataset.labels
    if config.fit_per_class and any(label < 0 for label in labels):
        raise ValueError(f"fit_per_class needs a class for every file; {dataset.root} has unlabelled files")
    bounds = _fit(dataset, list(range(len(dataset))), config, max_files, progress, "the intensity range")
    if not config.fit_per_class:
        return config.replace(normalization="dataset", bounds=bounds)
    class_bounds = {}
    for k, name in enumerate(dataset.class_names):
        members = [i for i, label in enumerate(labels) if label == k]
        if members:
            class_bounds[name] = _fit(dataset, members, config, max_files, progress, f"the range of {name}")
    return config.replace(normalization="dataset", bounds=bounds, class_bounds=class_bounds)


def _fit(dataset, members: list[int], config: DataConfig, max_files: int, progress: bool, what: str):
    """The ``percentiles`` of the values of an even spread of at most ``max_files`` of ``members``."""
    count = min(max_files, len(members))
    picks = np.unique(np.linspace(0, len(members) - 1, count).round().astype(int))
    rng = np.random.default_rng(config.seed)
    values: list[torch.Tensor] = []
    for pick in tqdm(picks, desc=f"fitting {what}", unit="file", disable=not progress):
        values.append(_subsample(dataset.read(members[int(pick)]), rng, config.per_channel))
    pooled = torch.cat(values, dim=1).double()
    q = torch.tensor(config.percentiles, dtype=torch.float64) / 100.0
    low, high = _quantile(pooled, q).unbind(0)
    return tuple((float(lo), float(hi)) for lo, hi in zip(low.tolist(), high.tolist()))


def _subsample(image: MedicalImage, rng: np.random.Generator, per_channel: bool) -> torch.Tensor:
    """The values of ``image`` as (channels, n) (or (1, n) over all channels), at most
    :data:`VALUES_PER_FILE` of them, finite ones only."""
    array = np.asarray(image.array, dtype=np.float64)
    flat = array.reshape(array.shape[0], -1) if per_channel else array.reshape(1, -1)
    if flat.shape[1] > VALUES_PER_FILE:
        flat = flat[:, rng.choice(flat.shape[1], VALUES_PER_FILE, replace=False)]
    flat = flat[:, np.isfinite(flat).all(axis=0)]
    return torch.from_numpy(np.ascontiguousarray(flat))


def training_geometry(dataset, config: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The spacing (physical order) and direction of ``dataset``'s images as the model sees them
    (after resampling and resizing).

    When the files' spacings differ and ``config.spacing`` does not resample them alike, the model
    learns voxel grids of different physical sizes: a ``UserWarning`` says so, and the spacing is
    the per-axis median of the files' (scaled as the transforms scale the first file's).
    """
    from medfusion.data.dataset import build_transform

    first = dataset.read(0)
    fixed = config.replace(
        random_crop=False, flip_axes=(), normalization="minmax", bounds=None, class_bounds=None
    )
    seen = build_transform(fixed)(first, np.random.default_rng(0))
    spacing = tuple(float(s) for s in seen.spacing)
    headers = getattr(dataset, "headers", None) or ()
    spacings = [tuple(round(float(s), 6) for s in h.spacing) for h in headers]
    different = sorted(set(spacings))
    if config.spacing is None and len(different) > 1:
        examples = ", ".join(str(list(s)) for s in different[:3])
        warnings.warn(
            f"{dataset.root}: the files have {len(different)} different voxel spacings ({examples}, ...) "
            "and data.spacing is not set: the model learns voxel grids of different physical sizes. "
            "Set data.spacing to resample them alike; the spacing recorded is the median of the files'",
            UserWarning,
            stacklevel=2,
        )
        median = [statistics.median(s[axis] for s in spacings) for axis in range(len(spacing))]
        scale = [new / old for new, old in zip(seen.spacing, first.spacing)]
        spacing = tuple(float(m * f) for m, f in zip(median, scale))
    return spacing, tuple(float(d) for d in seen.direction)


def describe_training_data(dataset) -> dict:
    """What a model folder and a synthetic dataset's card say about the training data: files,
    counts per class, the files' format, dtype and modality (of the first file)."""
    labels = dataset.labels
    counts = {name: labels.count(i) for i, name in enumerate(dataset.class_names)}
    return {
        "files": len(dataset),
        "counts": counts if any(label >= 0 for label in labels) else {},
        "format": dataset.info.format,
        "dtype": dataset.info.dtype,
        "modality": dataset.read(0).modality,
    }


def normalization_record(data: DataConfig) -> dict:
    """The intensity normalisation a model folder records (``medfusion.json``'s ``normalization``):
    the data config's fields, fitted bounds included, and the range of the tensors; what
    :func:`medfusion.data.writers.intensity_mapping` inverts."""
    return {
        "normalization": data.normalization,
        "percentiles": list(data.percentiles),
        "window": list(data.window) if data.window is not None else None,
        "per_channel": data.per_channel,
        "bounds": [list(pair) for pair in data.bounds] if data.bounds is not None else None,
        "class_bounds": {k: [list(pair) for pair in v] for k, v in (data.class_bounds or {}).items()} or None,
        "range": [-1.0, 1.0],
    }
