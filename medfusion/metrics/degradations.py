"""Known degradations of real images, for calibrating a yardstick (``medfusion evaluate --calibrate``).

Each takes images ``(N, C, *spatial)`` (2D or 3D alike) in the toolkit's range [-1, 1] and returns
a tensor of the same shape and range, the same for the same ``generator``. They stand for the
failures that make synthetic medical images useless:

================ ==============================================================================
``blur_1``       Gaussian blur, sigma 1 pixel/voxel (a generator that lost fine detail)
``blur_2``       Gaussian blur, sigma 2 pixels/voxels
``noise``        Gaussian noise with each image's own mean and standard deviation per channel
                 (intensity statistics right, content gone)
``shuffle``      the image cut into 8x8 (2D) or 4x4x4 (3D) patches, put back in a random order
                 (texture right, anatomy broken)
``inversion``    intensities mirrored within each image's own range (``min + max - x``)
``copies``       the images themselves (what memorisation looks like)
================ ==============================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PATCH_2D = 8
PATCH_3D = 4


def _blur_axis(x: torch.Tensor, axis: int, window: torch.Tensor) -> torch.Tensor:
    """``x`` blurred along ``axis`` with the 1D ``window``, edges reflected (replicated where the
    axis is too short to reflect)."""
    pad = (len(window) - 1) // 2
    moved = x.movedim(axis, -1)
    shape = moved.shape
    flat = moved.reshape(-1, 1, shape[-1])
    mode = "reflect" if shape[-1] > pad else "replicate"
    flat = F.conv1d(F.pad(flat, (pad, pad), mode=mode), window.view(1, 1, -1).to(flat))
    return flat.reshape(shape).movedim(-1, axis)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of every spatial axis of ``x`` (N, C, *spatial), ``sigma`` in pixels/voxels
    (the window reaches 3 sigma either side); the same shape."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    window = torch.exp(-0.5 * (offsets / sigma) ** 2)
    window = (window / window.sum()).float()
    out = x.float()
    for axis in range(2, x.ndim):
        out = _blur_axis(out, axis, window)
    return out.to(x.dtype)


def matched_noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise with the mean and standard deviation of each image and channel of ``x``,
    clipped to [-1, 1]."""
    flat = x.float().flatten(2)
    mean, std = flat.mean(-1, keepdim=True), flat.std(-1, keepdim=True)
    noise = torch.randn(flat.shape, generator=generator, dtype=torch.float32).to(x.device)
    return (mean + std * noise).clamp(-1, 1).reshape(x.shape).to(x.dtype)


def patch_shuffle(x: torch.Tensor, generator: torch.Generator, patch: int | None = None) -> torch.Tensor:
    """``x`` cut into cubes of side ``patch`` (default 8 in 2D, 4 in 3D) put back in a random order,
    a new order per image; a margin that holds no whole patch stays where it is."""
    dims = x.ndim - 2
    patch = patch or (PATCH_2D if dims == 2 else PATCH_3D)
    counts = [side // patch for side in x.shape[2:]]
    if min(counts) < 1 or math.prod(counts) < 2:
        raise ValueError(f"images of size {tuple(x.shape[2:])} hold fewer than two {patch}-wide patches")
    region = (slice(None), slice(None), *(slice(0, c * patch) for c in counts))
    inner = x[region]
    n, c = x.shape[:2]
    # (N, C, n1, p, n2, p, ...) -> (N, n1 * n2 * ..., C, p, p, ...)
    split = inner.reshape(n, c, *[v for count in counts for v in (count, patch)])
    order = [0] + [2 + 2 * i for i in range(dims)] + [1] + [3 + 2 * i for i in range(dims)]
    patches = split.permute(order).reshape(n, math.prod(counts), c, *[patch] * dims)
    shuffled = torch.stack([p[torch.randperm(len(p), generator=generator).to(p.device)] for p in patches])
    back = shuffled.reshape(n, *counts, c, *[patch] * dims)
    inverse = [0, dims + 1] + [v for i in range(dims) for v in (1 + i, dims + 2 + i)]
    out = x.clone()
    out[region] = back.permute(inverse).reshape(inner.shape)
    return out


def inversion(x: torch.Tensor) -> torch.Tensor:
    """Intensities mirrored within each image's own range: ``min + max - x`` per image and channel."""
    flat = x.flatten(2)
    low, high = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return (low + high - flat).reshape(x.shape)


@dataclass(frozen=True)
class Degradation:
    """A named degradation and what it stands for."""

    name: str
    description: str
    apply: Callable[[torch.Tensor, torch.Generator], torch.Tensor]


DEGRADATIONS: tuple[Degradation, ...] = (
    Degradation("blur_1", "Gaussian blur, sigma 1 pixel/voxel", lambda x, g: gaussian_blur(x, 1.0)),
    Degradation("blur_2", "Gaussian blur, sigma 2 pixels/voxels", lambda x, g: gaussian_blur(x, 2.0)),
    Degradation("noise", "Gaussian noise with each image's mean and standard deviation", matched_noise),
    Degradation(
        "shuffle",
        f"{PATCH_2D}x{PATCH_2D} (2D) or {PATCH_3D}x{PATCH_3D}x{PATCH_3D} (3D) patches in a random order",
        lambda x, g: patch_shuffle(x, g),
    ),
    Degradation("inversion", "intensities mirrored within each image's range", lambda x, g: inversion(x)),
    Degradation("copies", "exact copies of the images (for the memorisation audit)", lambda x, g: x),
)
