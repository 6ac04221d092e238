"""MS-SSIM of many pairs drawn from one set of images, with a separable Gaussian window.

The maths is torchmetrics' ``multiscale_structural_similarity_index_measure`` (1.9, as
:mod:`medfusion.metrics.reconstruction` calls it: Gaussian window, ``data_range=1``, ``k1=0.01``,
``k2=0.03``, ``normalize="relu"``), repeated here for speed, not changed:

- torchmetrics blurs with a dense ``kernel_size ** d`` window (1331 multiply-adds per voxel in
  3D, through a one-channel grouped convolution, which is slow on CPU). The Gaussian is separable,
  so this blurs one spatial axis at a time: reflect-pad that axis, then a weighted sum of
  ``kernel_size`` shifted views (a 1D convolution of every channel alike).
- the local means and second moments of each image are blurred once for the whole set; only the
  cross term ``x_a * x_b`` is blurred per pair.

Everything else follows torchmetrics: reflect padding by ``(kernel_size - 1) // 2``, the
similarity map averaged uncropped, the contrast map cropped by the padding before averaging, both
clamped at 0 per image, 2x average pooling between scales, the contrast of every scale but the
coarsest and the similarity of the coarsest raised to the betas and multiplied.
``tests/metrics/test_diversity.py`` pins this copy against torchmetrics in 2D and 3D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from medfusion.metrics.reconstruction import MultiScaleSSIMSettings
from medfusion.nn.layers import avg_pool_nd

K1, K2 = 0.01, 0.03  # torchmetrics' (and Wang et al.'s) SSIM constants; data_range is 1


def _gaussian_window(settings: MultiScaleSSIMSettings, dtype: torch.dtype) -> list[float]:
    # torchmetrics derives the window's width from sigma; reconstruction's settings make it agree.
    width = int(3.5 * settings.sigma + 0.5) * 2 + 1
    if width != settings.kernel_size:
        raise ValueError(
            f"sigma {settings.sigma} gives a {width}-wide Gaussian, not kernel_size {settings.kernel_size}"
        )
    dist = torch.arange((1 - width) / 2, (1 + width) / 2, 1, dtype=dtype)
    gauss = torch.exp(-torch.pow(dist / settings.sigma, 2) / 2)
    return (gauss / gauss.sum()).tolist()


def _blur(x: Tensor, window: list[float]) -> Tensor:
    """Gaussian blur of ``x`` ``(N, C, *spatial)`` along every spatial axis, reflect-padded: same shape."""
    pad = (len(window) - 1) // 2
    for axis in range(2, x.ndim):
        padding = [0, 0] * (x.ndim - 2)
        first = 2 * (x.ndim - 1 - axis)  # F.pad lists the last axis first
        padding[first : first + 2] = [pad, pad]
        x = F.pad(x, padding, mode="reflect")
        size = x.shape[axis] - 2 * pad
        blurred = x.narrow(axis, 0, size) * window[0]
        for shift, weight in enumerate(window[1:], start=1):
            blurred.add_(x.narrow(axis, shift, size), alpha=weight)
        x = blurred
    return x


@torch.no_grad()
def pairwise_ms_ssim(
    images: Tensor, pairs: Tensor, settings: MultiScaleSSIMSettings, batch_size: int = 64
) -> Tensor:
    """MS-SSIM of ``images[pairs[:, 0]]`` against ``images[pairs[:, 1]]``.

    Args:
        images: ``(N, C, *spatial)`` in [0, 1] (data range 1), floating point.
        pairs: ``(P, 2)`` indices into ``images``.
        settings: window and scales, from :func:`~medfusion.metrics.reconstruction.ms_ssim_settings`.
        batch_size: pairs blurred at a time.

    Returns:
        ``(P,)`` in [0, 1], in the dtype of ``images``.
    """
    window = _gaussian_window(settings, images.dtype)
    pad = (settings.kernel_size - 1) // 2
    crop = (..., *[slice(pad, -pad)] * (images.ndim - 2))
    c1, c2 = K1**2, K2**2
    pool = avg_pool_nd(images.ndim - 2, 2)
    pairs = pairs.to(images.device)
    factors = []  # per scale: (P,) contrast, or similarity at the coarsest scale
    x = images
    for scale in range(settings.scales):
        coarsest = scale == settings.scales - 1
        mu = _blur(x, window)  # (N, C, *spatial)
        mu_sq = mu.pow(2)
        variance = torch.clamp(_blur(x * x, window) - mu_sq, min=0.0)
        per_pair = []
        for a, b in (chunk.unbind(1) for chunk in pairs.split(batch_size)):
            mu_ab = mu[a] * mu[b]
            upper = 2 * (_blur(x[a] * x[b], window) - mu_ab) + c2
            lower = variance[a] + variance[b] + c2
            if coarsest:
                term = ((2 * mu_ab + c1) * upper) / ((mu_sq[a] + mu_sq[b] + c1) * lower)
            else:
                term = (upper / lower)[crop]
            per_pair.append(torch.relu(term.reshape(len(a), -1).mean(-1)))
        factors.append(torch.cat(per_pair))
        x = pool(x)
    betas = torch.tensor(settings.betas, device=images.device).view(-1, 1)
    return (torch.stack(factors) ** betas).prod(0)
