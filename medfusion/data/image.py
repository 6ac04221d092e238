"""In-memory image/volume with the geometry needed to write it back.

Conventions (those of SimpleITK/ITK, so that geometry round-trips through every writer):

- ``array`` has shape ``(C, *spatial)`` with the spatial axes in array order: ``(H, W)`` for 2D,
  ``(D, H, W)`` for 3D.
- ``spacing`` and ``origin`` are in physical axis order ``(x, y, z)``, i.e. the *reverse* of the
  array's spatial axes; ``direction`` is the row-major ``dims x dims`` direction-cosine matrix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np


def identity_direction(spatial_dims: int) -> tuple[float, ...]:
    """The row-major identity direction matrix for ``spatial_dims`` axes."""
    return tuple(float(v) for v in np.eye(spatial_dims).ravel())


@dataclass(frozen=True)
class ImageInfo:
    """What a reader learns from a file's header, without decoding the pixels.

    Attributes:
        path: the file (or DICOM series folder).
        format: reader name, e.g. ``"png"``, ``"dicom"``, ``"nifti"``, ``"dicom-series"``.
        spatial_dims: 2 or 3.
        shape: spatial size in array order, ``(H, W)`` or ``(D, H, W)``.
        channels: number of channels.
        dtype: numpy dtype name of the stored values, e.g. ``"uint8"``, ``"int16"``.
        spacing: voxel size in physical order ``(x, y, z)``.
    """

    path: str
    format: str
    spatial_dims: int
    shape: tuple[int, ...]
    channels: int
    dtype: str
    spacing: tuple[float, ...]


@dataclass(frozen=True)
class MedicalImage:
    """Pixel data of shape ``(C, *spatial)`` plus its geometry. See the module docstring.

    ``array`` is a numpy array as read (dtype kept) or, after intensity normalisation, a float32
    ``torch.Tensor``. ``label`` is the class of a dataset's item (None: unknown or unlabelled), for
    transforms that depend on it (per-class intensity bounds).
    """

    array: Any
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    path: str = ""
    modality: str = ""
    label: str | None = None

    def __post_init__(self) -> None:
        ndim = len(self.array.shape) - 1
        if ndim not in (2, 3):
            raise ValueError(
                f"array must have shape (C, H, W) or (C, D, H, W); got {tuple(self.array.shape)}"
            )
        if len(self.spacing) != ndim or len(self.origin) != ndim:
            raise ValueError(
                f"spacing {self.spacing} and origin {self.origin} must have {ndim} values "
                f"for an array of shape {tuple(self.array.shape)}"
            )
        if len(self.direction) != ndim * ndim:
            raise ValueError(f"direction must have {ndim * ndim} values; got {len(self.direction)}")

    @property
    def spatial_dims(self) -> int:
        return len(self.array.shape) - 1

    @property
    def channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape[1:])

    def replace(self, **changes: Any) -> MedicalImage:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_array(
        cls,
        array: Any,
        spacing: tuple[float, ...] | None = None,
        origin: tuple[float, ...] | None = None,
        direction: tuple[float, ...] | None = None,
        path: str = "",
    ) -> MedicalImage:
        """Wrap an array of shape ``(C, *spatial)``, defaulting to unit spacing at the origin."""
        ndim = len(array.shape) - 1
        return cls(
            array=array,
            spacing=tuple(spacing) if spacing is not None else (1.0,) * ndim,
            origin=tuple(origin) if origin is not None else (0.0,) * ndim,
            direction=tuple(direction) if direction is not None else identity_direction(ndim),
            path=path,
        )
