"""Transforms for 2D images and 3D volumes, one code path for both.

Each transform is a callable ``transform(image, rng) -> image`` on
:class:`~medfusion.data.image.MedicalImage`. Randomness comes only from the ``rng``
(``numpy.random.Generator``) passed in, so a pipeline is deterministic given a seed, whatever the
number of DataLoader workers. Spatial transforms work on float ``torch.Tensor`` data and keep the
geometry (spacing, origin) right, so that a transformed volume can still be written back in place.

Intensity normalisation maps values to [-1, 1]:

========== ==================================================================================
mode       mapping
========== ==================================================================================
dataset    clip to fixed ``bounds`` (low, high) per channel: the ``percentiles`` of the whole
           training set, fitted once (:func:`medfusion.data.fitting.fit_normalization`)
percentile clip to the ``percentiles`` (e.g. 0.5, 99.5) of the image, then scale (MR, X-ray)
window     clip to a fixed ``window`` (low, high), e.g. CT Hounsfield units (-1000, 1000)
dtype      the full range of the stored integer type (0..255 for uint8, 0..65535 for uint16)
minmax     the image's own minimum and maximum
auto       ``dtype`` for 8-bit data, ``window`` (-1000, 1000) for CT, otherwise ``dataset`` where
           the data was fitted (training) and ``percentile`` where it was not
========== ==================================================================================

``dataset``, ``window`` and ``dtype`` map every image alike, so a generated image maps back
exactly to the training data's units (:func:`medfusion.data.writers.intensity_mapping`);
``percentile`` and ``minmax`` map each image on its own, so what comes back is a relative scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medfusion.data.image import MedicalImage

Transform = Callable[[MedicalImage, np.random.Generator], MedicalImage]

NORMALIZATION_MODES = ("auto", "dataset", "percentile", "window", "dtype", "minmax")
# the modes that map every image alike: their inverse gives back the source units
FIXED_MODES = ("dataset", "window", "dtype")
CT_WINDOW = (-1000.0, 1000.0)
_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, image: MedicalImage, rng: np.random.Generator) -> MedicalImage:
        for transform in self.transforms:
            image = transform(image, rng)
        return image

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def as_float_tensor(array) -> torch.Tensor:
    """A float32 ``torch.Tensor`` view/copy of a numpy array or tensor."""
    if isinstance(array, torch.Tensor):
        return array.float()
    array = np.asarray(array)
    if not array.dtype.isnative:  # e.g. a big-endian NIfTI; torch takes native byte order only
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype == np.uint16 or array.dtype == np.uint32:
        array = array.astype(np.int64)  # torch has no unsigned 16/32-bit arithmetic
    if not array.flags.writeable:  # e.g. a read-only memory map; torch wants writable memory
        return torch.tensor(array, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(array)).float()


class NormalizeIntensity:
    """Map intensities to [-1, 1]; see the module docstring for the modes.

    Args:
        mode: one of ``auto``, ``dataset``, ``percentile``, ``window``, ``dtype``, ``minmax``.
        percentiles: (low, high) in percent, for ``percentile``.
        window: (low, high) values, for ``window``; defaults to CT (-1000, 1000) HU.
        per_channel: compute percentiles / min-max per channel (RGB) rather than over all.
        bounds: (low, high) per channel (one pair: every channel alike), for ``dataset``: fitted on
            the training set by :func:`medfusion.data.fitting.fit_normalization`.
        class_bounds: for ``dataset``, per class name its own ``bounds``, used for images whose
            ``label`` names the class (the others take ``bounds``).
    """

    def __init__(
        self,
        mode: str = "auto",
        percentiles: tuple[float, float] = (0.5, 99.5),
        window: tuple[float, float] | None = None,
        per_channel: bool = True,
        bounds: Sequence[Sequence[float]] | None = None,
        class_bounds: Mapping[str, Sequence[Sequence[float]]] | None = None,
    ):
        if mode not in NORMALIZATION_MODES:
            raise ValueError(f"mode must be one of {NORMALIZATION_MODES}; got {mode!r}")
        if len(percentiles) != 2:
            raise ValueError(f"percentiles must be (low, high); got {percentiles}")
        low, high = percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100; got {percentiles}")
        if window is not None and (len(window) != 2 or not window[0] < window[1]):
            raise ValueError(f"window must be (low, high) with low < high; got {window}")
        if mode == "dataset" and not bounds:
            raise ValueError(
                "normalization 'dataset' needs the bounds fitted on the training set "
                "(medfusion.data.fitting.fit_normalization)"
            )
        bounds = _pairs(bounds, "bounds") if bounds is not None else None
        self.class_bounds = {
            str(k): _pairs(v, f"class_bounds[{k!r}]") for k, v in (class_bounds or {}).items()
        }
        self.mode = mode
        self.percentiles = (float(low), float(high))
        self.window = window
        self.per_channel = per_channel
        self.bounds = bounds

    def resolve_mode(self, image: MedicalImage) -> str:
        """The concrete mode ``auto`` picks for ``image``."""
        if self.mode != "auto":
            return self.mode
        if self.bounds is not None:
            return "dataset"
        dtype = np.dtype(str(image.array.dtype).replace("torch.", ""))
        if dtype == np.uint8:
            return "dtype"
        if image.modality.upper() == "CT" or self.window is not None:
            return "window"
        return "percentile"

    def _bounds(
        self, x: torch.Tensor, mode: str, dtype: np.dtype, label: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(x.shape[0], -1) if self.per_channel else x.reshape(1, -1)
        if mode == "percentile":
            q = torch.tensor(self.percentiles, dtype=torch.float64) / 100.0
            lo, hi = (_quantile(flat.double(), q)).float().unbind(0)
        elif mode == "minmax":
            lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        elif mode == "dataset":
            bounds = self.class_bounds.get(label, self.bounds) if label is not None else self.bounds
            if len(bounds) not in (1, x.shape[0]):
                raise ValueError(
                    f"normalization 'dataset' has bounds for {len(bounds)} channels; the image {x.shape[0]}"
                )
            lo, hi = torch.tensor(bounds, dtype=torch.float32).unbind(1)
        elif mode == "window":
            low, high = self.window or CT_WINDOW
            lo, hi = torch.tensor([low]), torch.tensor([high])
        elif mode == "dtype":
            if not np.issubdtype(dtype, np.integer):
                raise ValueError(
                    f"normalization 'dtype' needs integer data; got {dtype} "
                    "(use 'percentile', 'minmax' or 'window')"
                )
            info = np.iinfo(dtype)
            lo, hi = torch.tensor([float(info.min)]), torch.tensor([float(info.max)])
        else:
            raise ValueError(f"unknown normalization mode {mode!r}")
        return lo, hi

    def __call__(self, image: MedicalImage, rng: np.random.Generator) -> MedicalImage:
        mode = self.resolve_mode(image)
        dtype = np.dtype(str(image.array.dtype).replace("torch.", ""))
        x = as_float_tensor(image.array)
        lo, hi = self._bounds(x, mode, dtype, image.label)
        shape = (-1,) + (1,) * image.spatial_dims
        lo, hi = lo.reshape(shape), hi.reshape(shape)
        scale = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        out = ((x.clamp(min=lo, max=hi) - lo) / scale) * 2.0 - 1.0
        out = torch.where(hi > lo, out, torch.zeros_like(out))  # constant image -> 0
        return image.replace(array=out.contiguous())

    def __repr__(self) -> str:
        return f"NormalizeIntensity(mode={self.mode!r})"


def _pairs(values: Sequence[Sequence[float]], name: str) -> tuple[tuple[float, float], ...]:
    """``values`` as (low, high) pairs of finite floats with low <= high, at least one."""
    pairs = tuple((float(lo), float(hi)) for lo, hi in values)
    if not pairs or any(not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi) for lo, hi in pairs):
        raise ValueError(f"{name} must be (low, high) pairs of finite numbers, low <= high; got {values}")
    return pairs


def _quantile(flat: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row quantiles ``(len(q), rows)``; subsamples very large rows (torch.quantile's limit)."""
    limit = 1 << 24
    if flat.shape[1] > limit:
        step = math.ceil(flat.shape[1] / limit)
        flat = flat[:, ::step]
    return torch.quantile(flat, q, dim=1)


def _physical_offset(image: MedicalImage, index_offset: Sequence[float]) -> tuple[float, ...]:
    """Origin after moving the grid start by ``index_offset`` voxels (array order)."""
    dims = image.spatial_dims
    direction = np.asarray(image.direction, dtype=np.float64).reshape(dims, dims)
    step_xyz = np.asarray(list(reversed(index_offset)), dtype=np.float64) * np.asarray(image.spacing)
    return tuple(float(v) for v in np.asarray(image.origin) + direction @ step_xyz)


def _normalize_size(size: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    sizes = (size,) * spatial_dims if isinstance(size, int) else tuple(int(s) for s in size)
    if len(sizes) != spatial_dims or any(s < 1 for s in sizes):
        raise ValueError(f"{name} must be a positive int or {spatial_dims} positive ints; got {size!r}")
    return sizes


def _interpolate(x: torch.Tensor, size: tuple[int, ...], mode: str) -> torch.Tensor:
    spatial_dims = x.ndim - 1
    shrinking = all(new <= old for new, old in zip(size, x.shape[1:]))
    if mode == "auto":
        mode = "area" if shrinking else "linear"
    if mode == "linear":
        return F.interpolate(x[None], size=size, mode=_LINEAR_MODES[spatial_dims], align_corners=False)[0]
    if mode in ("area", "nearest", "nearest-exact"):
        return F.interpolate(x[None], size=size, mode=mode)[0]
    raise ValueError(f"interpolation mode must be auto, linear, area or nearest; got {mode!r}")


class Resize:
    """Resize to ``size`` voxels (array order ``(H, W)`` / ``(D, H, W)``), updating the spacing.

    Args:
        size: int (all axes) or one int per spatial axis.
        mode: ``auto`` (area when shrinking every axis, else linear), ``linear``, ``area``,
            ``nearest``.
    """

    def __init__(self, size: int | Sequence[int], mode: str = "auto"):
        self.size = size
        self.mode = mode
        if mode not in ("auto", "linear", "area", "nearest", "nearest-exact"):
            raise ValueError(f"mode must be auto, linear, area or nearest; got {mode!r}")

    def __call__(self, image: MedicalImage, rng: np.random.Generator) -> MedicalImage:
        size = _normalize_size(self.size, image.spatial_dims, "size")
        old = image.spatial_shape
        if size == old:
            return image.replace(array=as_float_tensor(image.array))
        out = _interpolate(as_float_tensor(image.array), size, self.mode)
        spacing = tuple(s * o / n for s, o, n in zip(image.spacing, reversed(old), reversed(size)))
        return image.replace(array=out.contiguous(), spacing=spacing)

    def __repr__(self) -> str:
        return f"Resize(size={self.size!r})"


class Resample:
    """Resample to a target ``spacing`` given in physical order ``(x, y[, z])``, as in headers.

    The new size is ``round(size * spacing / target)`` per axis; the spacing is then set exactly
    so that the physical extent is kept.
    """

    def __init__(self, spacing: float | Sequence[float], mode: str = "linear"):
        self.spacing = spacing
        self.mode = mode

    def __call__(self, image: MedicalImage, rng: np.random.Generator) -> MedicalImage:
        dims = image.spatial_dims
        target = (float(self.spacing),) * dims if np.isscalar(self.spacing) else tuple(self.spacing)
        if len(target) != dims or any(t <= 0 for t in target):
            raise ValueError(
                f"spacing must be a positive number or {dims} positive numbers; got {self.spacing!r}"
            )
        target_array_order = tuple(reversed(target))
        current_array_order = tuple(reversed(image.spacing))
        size = tuple(
            max(1, round(n * s / t))
            for n, s, t in zip(image.spatial_shape, current_array_order, target_array_order)
        )
        return Resize(size, mode=self.mode)(image, rng)

    def __repr__(self) -> str:
        return f"Resample(spacing={self.spacing!r})"


class CropOrPad:
    """Crop and/or pad to exactly ``size`` voxels (array order), keeping the origin right.

    Args:
        size: int (all axes) or one int per spatial axis.
        random: choose crop offsets at random (training augmentation); centre otherwise. Padding
            is always centred.
        pad_value: value of padded voxels (-1 is the background after normalisation).
    """

    def __init__(self, size: int | Sequence[int], random: bool = False, pad_value: float = -1.0):
        self.size = size
        self.random = random
        self.pad_value = pad_value

    def __call__(self, image: MedicalImage, rng: np.random.Generator) -> MedicalImage:
        size = _normalize_size(self.size, image.spatial_dims, "size")
        x = as_float_tensor(image.array)
        starts = []
        for old, new in zip(image.spatial_shape, size):
            if old > new:
                starts.append(int(rng.integers(0, old - new + 1)) if self.random else (old - new) // 2)
            else:
                starts.append(-((new - old) // 2))
        crop = tuple(
            slice(max(s, 0), max(s, 0) + min(o, n)) for s, o, n in zip(starts, image.spatial_shape, size)
        )
        x = x[(slice(None), *crop)]
        pads: list[int] = []
        for old_cropped, new, start in zip(reversed(x.shape[1:]), reversed(size), reversed(starts)):
            before = -start if start < 0 else 0
            pads += [before, new - old_cropped - before]
        if any(pads):
            x = F.pad(x, pads, value=self.pad_value)
        return image.replace(array=x.contiguous(), origin=_physical_offset(image, starts))

    def __repr__(self) -> str:
        return f"CropOrPad(size={self.size!r}, random={self.random})"


class RandomFlip:
    """Flip each of ``axes`` (spatial axes in array order, 0-based) with probability ``p``."""

    def __init__(self, axes: Sequence[int] | None = None, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1]; got {p}")
        self.axes = None if axes is None else tuple(int(a) for a in axes)
        self.p = p

    def __call__(self, image: MedicalImage, rng: np.random.Generator) -> MedicalImage:
        axes = self.axes if self.axes is not None else tuple(range(image.spatial_dims))
        if any(not 0 <= a < image.spatial_dims for a in axes):
            raise ValueError(f"flip axes must be in [0, {image.spatial_dims}); got {axes}")
        flips = [a + 1 for a in axes if rng.random() < self.p]
        x = as_float_tensor(image.array)
        return image.replace(array=torch.flip(x, flips) if flips else x)

    def __repr__(self) -> str:
        return f"RandomFlip(axes={self.axes}, p={self.p})"
