"""Pictures for training logs and reports: middle slices of volumes, image grids, PNG files.

Everything takes tensors in the toolkit's range [-1, 1] (``value_range`` says otherwise) and works
for 2D batches ``(N, C, H, W)`` and volumes ``(N, C, D, H, W)``; a volume is shown by its three
orthogonal middle slices (:func:`mid_slices`). torchvision is deliberately not used.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from medfusion.data.writers import to_unsigned
from medfusion.utils import atomic_path, full_suffix


def mid_slices(x: Tensor, pad_value: float = -1.0) -> Tensor:
    """Show each volume as its three orthogonal middle slices side by side.

    Left to right: the slice at ``D // 2`` (``H x W``, axial for a ``(D, H, W)`` volume), the one at
    ``H // 2`` (``D x W``, coronal) and the one at ``W // 2`` (``D x H``, sagittal). No axis is
    flipped, so D runs top to bottom in the last two. Slices shorter than the tallest are padded
    below with ``pad_value``.

    Args:
        x: volumes ``(N, C, D, H, W)``; images ``(N, C, H, W)`` are returned unchanged.
        pad_value: fill for the padding.

    Returns:
        ``(N, C, max(H, D), 2 * W + H)`` for volumes, else ``x``.
    """
    if x.ndim == 4:
        return x
    if x.ndim != 5:
        raise ValueError(f"x must be (N, C, H, W) or (N, C, D, H, W); got shape {tuple(x.shape)}")
    depth, height, width = x.shape[2:]
    views = [
        x[:, :, depth // 2],  # (N, C, H, W)
        x[:, :, :, height // 2],  # (N, C, D, W)
        x[:, :, :, :, width // 2],  # (N, C, D, H)
    ]
    top = max(height, depth)
    views = [F.pad(v, (0, 0, 0, top - v.shape[2]), value=pad_value) for v in views]
    return torch.cat(views, dim=3)


def make_grid(images: Tensor, nrow: int = 8, padding: int = 2, pad_value: float = -1.0) -> Tensor:
    """Tile a batch into one image, row by row, like ``torchvision.utils.make_grid``.

    Image ``i`` goes to row ``i // nrow``, column ``i % nrow``; every image is framed by ``padding``
    pixels of ``pad_value`` (shared between neighbours), unused cells of the last row stay
    ``pad_value``. Unlike torchvision, one channel stays one channel (see :func:`to_uint8`).

    Args:
        images: ``(N, C, H, W)``; show volumes through :func:`mid_slices` first.
        nrow: images per row.
        padding: pixels between and around images.
        pad_value: fill for the padding.

    Returns:
        ``(C, rows * (H + padding) + padding, cols * (W + padding) + padding)`` with
        ``cols = min(nrow, N)`` and ``rows = ceil(N / cols)``.
    """
    if images.ndim != 4:
        raise ValueError(
            f"images must be (N, C, H, W) (use mid_slices for volumes); got shape {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image; got an empty batch")
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1; got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be at least 0; got {padding}")
    count, channels, height, width = images.shape
    cols = min(nrow, count)
    rows = -(-count // cols)
    cell_h, cell_w = height + padding, width + padding
    grid = images.new_full((channels, rows * cell_h + padding, cols * cell_w + padding), pad_value)
    for i, image in enumerate(images):
        top, left = (i // cols) * cell_h + padding, (i % cols) * cell_w + padding
        grid[:, top : top + height, left : left + width] = image
    return grid


def to_uint8(grid: Tensor, value_range: tuple[float, float] | None = (-1.0, 1.0)) -> np.ndarray:
    """Convert an image to 8 bits for PNG or a logger.

    One channel gives a grey image, three an RGB image. Any other number of channels (2 for a
    complex/two-contrast input, 4+ for latents) gives a grey image with the channels laid side by
    side, channel 0 leftmost, so that none is hidden and none is mistaken for a colour.

    Args:
        grid: ``(C, H, W)``, e.g. from :func:`make_grid`.
        value_range: values mapped to 0 and 255 (outside clipped); ``None`` uses the image's own
            minimum and maximum (useful for latents).

    Returns:
        ``uint8`` array ``(H, W)`` for ``C == 1``, ``(H, W, 3)`` for ``C == 3``, else ``(H, C * W)``.
    """
    if grid.ndim != 3:
        raise ValueError(f"grid must be (C, H, W); got shape {tuple(grid.shape)}")
    x = grid.detach().to("cpu", torch.float64)
    if value_range is None:
        low, high = x.min().item(), x.max().item()
    else:
        low, high = (float(v) for v in value_range)
        if not low < high:
            raise ValueError(f"value_range must be (low, high) with low < high; got {value_range}")
    x = (x - low) / (high - low) * 2 - 1 if high > low else torch.full_like(x, -1.0)  # now in [-1, 1]
    if x.shape[0] == 3:
        return to_unsigned(x.permute(1, 2, 0).numpy(), 8)
    return to_unsigned(torch.cat(list(x), dim=1).numpy(), 8)  # (H, C * W); C == 1 gives (H, W)


def save_grid(
    images: Tensor,
    path: str | os.PathLike,
    nrow: int = 8,
    value_range: tuple[float, float] | None = (-1.0, 1.0),
) -> Path:
    """Write a batch as one PNG grid, atomically: volumes as their middle slices.

    Args:
        images: ``(N, C, H, W)`` or ``(N, C, D, H, W)``.
        path: the ``.png`` file to write (folders are created).
        nrow: images per row.
        value_range: see :func:`to_uint8`.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    if full_suffix(path) != ".png":
        raise ValueError(f"save_grid writes PNG files; the path must end in .png, got {path}")
    array = to_uint8(make_grid(mid_slices(images), nrow=nrow), value_range=value_range)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


def reconstruction_grid(inputs: Tensor, reconstructions: Tensor) -> Tensor:
    """Interleave inputs with their reconstructions for a side-by-side picture.

    Input ``i`` goes to position ``2 * i`` and its reconstruction to ``2 * i + 1``, so a grid with an
    even ``nrow`` shows ``nrow / 2`` pairs ``input | reconstruction`` per row. Volumes are reduced
    to their middle slices first.

    Args:
        inputs: ``(N, C, H, W)`` or ``(N, C, D, H, W)``.
        reconstructions: same shape.

    Returns:
        ``(2 * N, C, H', W')`` ready for :func:`make_grid` or :func:`save_grid`.
    """
    if inputs.shape != reconstructions.shape:
        raise ValueError(
            f"inputs and reconstructions must have the same shape; got inputs {tuple(inputs.shape)} "
            f"and reconstructions {tuple(reconstructions.shape)}"
        )
    pairs = torch.stack([mid_slices(inputs), mid_slices(reconstructions)], dim=1)  # (N, 2, C, H', W')
    return pairs.flatten(0, 1)
