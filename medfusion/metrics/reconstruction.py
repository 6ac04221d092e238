"""Reconstruction quality of an autoencoder: PSNR, SSIM and MS-SSIM, per sample, 2D and 3D.

Inputs are ``(N, C, *spatial)`` tensors in the toolkit's training range [-1, 1]; they are mapped to
[0, 1] (and clamped) before scoring, so every metric uses ``data_range = 1``. The maths is
torchmetrics'; this module chooses the Gaussian window and the number of MS-SSIM scales so that
small crops (64x64) and small volumes (16^3, 32^3) can be scored at all, and records that choice.

Kernel choice: the standard window is 11 wide with sigma 1.5 (Wang et al. 2003/2004). Smaller odd
windows keep the same shape, ``sigma = 1.5 * kernel_size / 11``, which is also what makes
torchmetrics' Gaussian (whose width it derives from sigma) exactly ``kernel_size`` wide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

STANDARD_KERNEL_SIZE = 11
STANDARD_SIGMA = 1.5
# Window widths tried, widest first; the standard one is always preferred when it fits.
KERNEL_SIZES = (11, 9, 7, 5, 3)
# Scale weights of Wang, Simoncelli & Bovik (2003), finest scale first.
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# Fewer than two scales would be plain SSIM under another name.
MIN_MS_SSIM_SCALES = 2
# Identical images have an infinite PSNR; the meter caps each sample here before averaging
# (an MSE of 1e-10 on [0, 1] images, far above any real reconstruction, which scores 20-50 dB).
PSNR_CAP_DB = 100.0


@dataclass(frozen=True)
class SSIMSettings:
    """The Gaussian window SSIM is computed with.

    Attributes:
        kernel_size: window width in pixels/voxels along every spatial axis (odd).
        sigma: standard deviation of the Gaussian, ``1.5 * kernel_size / 11``.
    """

    kernel_size: int
    sigma: float


@dataclass(frozen=True)
class MultiScaleSSIMSettings:
    """The window and scales MS-SSIM is computed with.

    Attributes:
        scales: number of scales (each halves every spatial axis), 2 to 5.
        kernel_size: window width along every spatial axis (odd).
        sigma: standard deviation of the Gaussian, ``1.5 * kernel_size / 11``.
        betas: weight of each scale, finest first: the first ``scales`` of :data:`MS_SSIM_BETAS`,
            renormalised to sum 1 (the standard five are used unchanged).
    """

    scales: int
    kernel_size: int
    sigma: float
    betas: tuple[float, ...]


@dataclass(frozen=True)
class ReconstructionMetrics:
    """Mean reconstruction quality over ``count`` samples.

    Attributes:
        psnr: mean PSNR in dB, each sample capped at :data:`PSNR_CAP_DB`.
        ssim: mean SSIM.
        ms_ssim: mean MS-SSIM.
        count: number of samples averaged.
        ssim_settings: the window SSIM used.
        ms_ssim_settings: the window and scales MS-SSIM used.
    """

    psnr: float
    ssim: float
    ms_ssim: float
    count: int
    ssim_settings: SSIMSettings
    ms_ssim_settings: MultiScaleSSIMSettings

    def to_dict(self) -> dict[str, float | int]:
        """Flat dict of scalars, ready for ``accelerator.log`` or JSON.

        Returns:
            ``psnr``, ``ssim``, ``ms_ssim``, ``count``, ``ssim_kernel_size``, ``ssim_sigma``,
            ``ms_ssim_scales``, ``ms_ssim_kernel_size``, ``ms_ssim_sigma`` (the betas follow from
            ``ms_ssim_scales``).
        """
        return {
            "psnr": self.psnr,
            "ssim": self.ssim,
            "ms_ssim": self.ms_ssim,
            "count": self.count,
            "ssim_kernel_size": self.ssim_settings.kernel_size,
            "ssim_sigma": self.ssim_settings.sigma,
            "ms_ssim_scales": self.ms_ssim_settings.scales,
            "ms_ssim_kernel_size": self.ms_ssim_settings.kernel_size,
            "ms_ssim_sigma": self.ms_ssim_settings.sigma,
        }


def _sigma_for(kernel_size: int) -> float:
    return STANDARD_SIGMA * kernel_size / STANDARD_KERNEL_SIZE


def _smallest_side(spatial_shape: Sequence[int]) -> int:
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"spatial_shape must be 2 or 3 positive sizes (H, W) or (D, H, W); got {shape}")
    return min(shape)


def _ms_ssim_fits(side: int, scales: int, kernel_size: int) -> bool:
    # The coarsest scale must hold a whole window (the published criterion), and torchmetrics'
    # own checks must pass: side >= 2**scales and side // max(1, scales - 1)**2 > kernel_size - 1.
    return (
        side // 2 ** (scales - 1) >= kernel_size
        and side >= 2**scales
        and side // max(1, scales - 1) ** 2 > kernel_size - 1
    )


def _ms_ssim_choice(side: int) -> MultiScaleSSIMSettings | None:
    for kernel_size in KERNEL_SIZES:
        for scales in range(len(MS_SSIM_BETAS), MIN_MS_SSIM_SCALES - 1, -1):
            if _ms_ssim_fits(side, scales, kernel_size):
                betas = MS_SSIM_BETAS[:scales]
                if scales < len(MS_SSIM_BETAS):
                    betas = tuple(float(b) / sum(betas) for b in betas)
                return MultiScaleSSIMSettings(scales, kernel_size, _sigma_for(kernel_size), betas)
    return None


def _ms_ssim_min_side() -> int:
    side = 1
    while _ms_ssim_choice(side) is None:
        side += 1
    return side


def ssim_settings(spatial_shape: Sequence[int]) -> SSIMSettings:
    """Choose the SSIM window for images of ``spatial_shape``: the widest of :data:`KERNEL_SIZES`
    no wider than the smallest side.

    Args:
        spatial_shape: ``(H, W)`` or ``(D, H, W)``.

    Returns:
        The chosen :class:`SSIMSettings`.

    Raises:
        ValueError: if the smallest side is below the narrowest window (3).
    """
    side = _smallest_side(spatial_shape)
    for kernel_size in KERNEL_SIZES:
        if kernel_size <= side:
            return SSIMSettings(kernel_size, _sigma_for(kernel_size))
    raise ValueError(
        f"SSIM needs every spatial size to be at least {min(KERNEL_SIZES)}; "
        f"got spatial shape {tuple(spatial_shape)} (smallest side {side})"
    )


def ms_ssim_settings(spatial_shape: Sequence[int]) -> MultiScaleSSIMSettings:
    """Choose the MS-SSIM window and number of scales for images of ``spatial_shape``.

    The standard 11-wide window (sigma 1.5) is kept whenever it allows at least two scales, with as
    many scales (up to 5) as fit; otherwise the widest smaller window of :data:`KERNEL_SIZES` that
    allows two or more scales is used. A setting fits when the coarsest scale (the smallest side
    halved ``scales - 1`` times) is at least one window wide. For example 256^2 -> 5 scales/11,
    64^2 -> 3/11, 32^2 -> 2/11, 16^3 -> 2/7, 8^3 -> 2/3.

    Args:
        spatial_shape: ``(H, W)`` or ``(D, H, W)``.

    Returns:
        The chosen :class:`MultiScaleSSIMSettings`.

    Raises:
        ValueError: if no setting fits (smallest side below 6).
    """
    side = _smallest_side(spatial_shape)
    settings = _ms_ssim_choice(side)
    if settings is None:
        raise ValueError(
            f"MS-SSIM needs every spatial size to be at least {_ms_ssim_min_side()} "
            f"({MIN_MS_SSIM_SCALES} scales with a {min(KERNEL_SIZES)}-wide window); "
            f"got spatial shape {tuple(spatial_shape)} (smallest side {side})"
        )
    return settings


def _prepare(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Check the pair and map both from [-1, 1] to [0, 1] (clamped), in float32 or wider."""
    if preds.shape != target.shape:
        raise ValueError(
            f"preds and target must have the same shape; got preds {tuple(preds.shape)} "
            f"and target {tuple(target.shape)}"
        )
    if preds.ndim not in (4, 5):
        raise ValueError(
            "preds and target must be (N, C, H, W) or (N, C, D, H, W); "
            f"got preds {tuple(preds.shape)} and target {tuple(target.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(preds.dtype, target.dtype), torch.float32)
    return tuple(((x.to(dtype) + 1) / 2).clamp(0, 1) for x in (preds, target))


def _psnr_unit(preds: Tensor, target: Tensor) -> Tensor:
    dims = tuple(range(1, preds.ndim))
    return peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=dims)


def _ssim_unit(preds: Tensor, target: Tensor, settings: SSIMSettings) -> Tensor:
    return structural_similarity_index_measure(
        preds,
        target,
        sigma=settings.sigma,
        kernel_size=settings.kernel_size,
        reduction="none",
        data_range=1.0,
    )


def _ms_ssim_unit(preds: Tensor, target: Tensor, settings: MultiScaleSSIMSettings) -> Tensor:
    return multiscale_structural_similarity_index_measure(
        preds,
        target,
        sigma=settings.sigma,
        kernel_size=settings.kernel_size,
        reduction="none",
        data_range=1.0,
        betas=settings.betas,
        # A negative similarity or contrast term (anti-correlated structure) raised to a fractional
        # beta is NaN. "relu" clamps those terms to 0, so such a sample scores 0, the floor, and
        # every other sample keeps exactly the published value. "simple" ((x + 1) / 2 on every term)
        # would avoid NaN too but shift all scores away from the values reported in the literature.
        normalize="relu",
    )


def psnr(preds: Tensor, target: Tensor) -> Tensor:
    """Peak signal-to-noise ratio of each sample, in dB, on [0, 1] images (data range 1).

    Args:
        preds: reconstructions, ``(N, C, *spatial)`` in [-1, 1].
        target: originals, same shape.

    Returns:
        ``(N,)``; ``inf`` where a sample is reproduced exactly.
    """
    return _psnr_unit(*_prepare(preds, target))


def ssim(preds: Tensor, target: Tensor) -> Tensor:
    """Structural similarity of each sample (mean over channels and positions), window from
    :func:`ssim_settings`.

    Args:
        preds: reconstructions, ``(N, C, *spatial)`` in [-1, 1].
        target: originals, same shape.

    Returns:
        ``(N,)``; 1 for identical images.
    """
    preds, target = _prepare(preds, target)
    return _ssim_unit(preds, target, ssim_settings(preds.shape[2:]))


def ms_ssim(preds: Tensor, target: Tensor) -> Tensor:
    """Multi-scale structural similarity of each sample, settings from :func:`ms_ssim_settings`.

    Args:
        preds: reconstructions, ``(N, C, *spatial)`` in [-1, 1].
        target: originals, same shape.

    Returns:
        ``(N,)`` in [0, 1]; 1 for identical images.
    """
    preds, target = _prepare(preds, target)
    return _ms_ssim_unit(preds, target, ms_ssim_settings(preds.shape[2:]))


class ReconstructionMeter:
    """Streaming means of PSNR, SSIM and MS-SSIM over a held-out set, batch by batch.

    Per-sample values are summed, so the result is a mean over samples whatever the batch sizes.
    PSNR is capped per sample at :data:`PSNR_CAP_DB` before summing, so an exactly reproduced
    sample counts as 100 dB instead of making the mean infinite. All batches must lead to the same
    SSIM/MS-SSIM settings (the same smallest side, in effect): a mean over different windows would
    not be one metric.

    Under Accelerate, gather first (``accelerator.gather_for_metrics((preds, target))``, which also
    drops the samples repeated to even out the last batch) and update with the gathered tensors, or
    keep one meter per process and :meth:`merge` them.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every sample seen so far."""
        self._psnr_sum = 0.0
        self._ssim_sum = 0.0
        self._ms_ssim_sum = 0.0
        self._count = 0
        self._settings: tuple[SSIMSettings, MultiScaleSSIMSettings] | None = None

    @property
    def count(self) -> int:
        """Number of samples accumulated so far."""
        return self._count

    def _adopt(self, settings: tuple[SSIMSettings, MultiScaleSSIMSettings]) -> None:
        if self._settings is not None and self._settings != settings:
            raise ValueError(
                f"this meter uses SSIM/MS-SSIM settings {self._settings}; "
                f"the new samples need {settings} (different image sizes?)"
            )
        self._settings = settings

    @torch.no_grad()
    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch.

        Args:
            preds: reconstructions, ``(N, C, *spatial)`` in [-1, 1].
            target: originals, same shape.
        """
        preds, target = _prepare(preds.detach(), target.detach())
        settings = (ssim_settings(preds.shape[2:]), ms_ssim_settings(preds.shape[2:]))
        self._adopt(settings)
        self._psnr_sum += _psnr_unit(preds, target).clamp(max=PSNR_CAP_DB).double().sum().item()
        self._ssim_sum += _ssim_unit(preds, target, settings[0]).double().sum().item()
        self._ms_ssim_sum += _ms_ssim_unit(preds, target, settings[1]).double().sum().item()
        self._count += preds.shape[0]

    def merge(self, other: ReconstructionMeter) -> None:
        """Add the samples accumulated by ``other`` (e.g. another process's meter) to this one.

        Args:
            other: a meter whose settings agree with this one's (or either is empty).
        """
        if other._settings is None:
            return
        self._adopt(other._settings)
        self._psnr_sum += other._psnr_sum
        self._ssim_sum += other._ssim_sum
        self._ms_ssim_sum += other._ms_ssim_sum
        self._count += other._count

    def compute(self) -> ReconstructionMetrics:
        """Means over every sample added since the last :meth:`reset`.

        Returns:
            :class:`ReconstructionMetrics`.

        Raises:
            RuntimeError: if no sample was added.
        """
        if self._settings is None or self._count == 0:
            raise RuntimeError("ReconstructionMeter.compute() called before any update()")
        return ReconstructionMetrics(
            psnr=self._psnr_sum / self._count,
            ssim=self._ssim_sum / self._count,
            ms_ssim=self._ms_ssim_sum / self._count,
            count=self._count,
            ssim_settings=self._settings[0],
            ms_ssim_settings=self._settings[1],
        )


__all__ = [
    "KERNEL_SIZES",
    "MS_SSIM_BETAS",
    "PSNR_CAP_DB",
    "MultiScaleSSIMSettings",
    "ReconstructionMeter",
    "ReconstructionMetrics",
    "SSIMSettings",
    "ms_ssim",
    "ms_ssim_settings",
    "psnr",
    "ssim",
    "ssim_settings",
]
