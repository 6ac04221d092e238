"""Diversity of a set of images: the mean pairwise MS-SSIM within each class.

Lower is more diverse: identical images score 1, unrelated ones near 0. A class whose synthetic
samples score far above its real images has collapsed onto few modes. Pairs are drawn at random
(without repeats, never an image with itself) when a class has more than ``max_pairs`` of them.
The scores are :func:`~medfusion.metrics.reconstruction.ms_ssim`'s (same settings and maths), computed
by :mod:`medfusion.metrics._ssim` with a separable window and each image's statistics shared by its
pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medfusion.metrics._ssim import pairwise_ms_ssim
from medfusion.metrics.reconstruction import _prepare, ms_ssim_settings


@dataclass(frozen=True)
class Diversity:
    """Mean pairwise MS-SSIM per class (``None`` key: all images together) and the pairs used."""

    per_class: dict[str | None, float]
    pairs: dict[str | None, int]


def _pairs(n: int, max_pairs: int, generator: torch.Generator) -> torch.Tensor:
    total = n * (n - 1) // 2
    if total <= max_pairs:
        return torch.combinations(torch.arange(n), 2)
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < max_pairs:
        i, j = torch.randint(n, (2, 2 * max_pairs), generator=generator)
        for a, b in zip(i.tolist(), j.tolist()):
            if a != b:
                chosen.add((min(a, b), max(a, b)))
                if len(chosen) == max_pairs:
                    break
    return torch.tensor(sorted(chosen))


def mean_pairwise_ms_ssim(
    images: torch.Tensor, max_pairs: int = 1000, batch_size: int = 64, seed: int = 0
) -> tuple[float, int]:
    """Mean MS-SSIM over pairs of ``images`` ``(N, C, *spatial)`` in [-1, 1]; and the number of pairs."""
    if images.shape[0] < 2:
        raise ValueError(f"diversity needs at least 2 images; got {images.shape[0]}")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1; got {max_pairs}")
    pairs = _pairs(images.shape[0], max_pairs, torch.Generator().manual_seed(seed))
    images, _ = _prepare(images, images)  # to [0, 1] in float32 or wider, as ms_ssim does
    scores = pairwise_ms_ssim(images, pairs, ms_ssim_settings(images.shape[2:]), batch_size)
    return float(scores.double().mean()), len(pairs)


def diversity(
    images: torch.Tensor, labels: Sequence[str | None] | None = None, max_pairs: int = 1000, seed: int = 0
) -> Diversity:
    """Mean pairwise MS-SSIM within each class of ``images`` (and over all when unlabelled).

    Args:
        images: ``(N, C, *spatial)`` in [-1, 1].
        labels: one class per image, or None.
        max_pairs: pairs per class at most (drawn at random beyond).
        seed: seed of the pair draws.
    """
    labels = [None] * images.shape[0] if labels is None else list(labels)
    if len(labels) != images.shape[0]:
        raise ValueError(f"got {len(labels)} labels for {images.shape[0]} images")
    per_class, pairs = {}, {}
    for label in sorted(set(labels), key=str):
        index = torch.tensor([i for i, value in enumerate(labels) if value == label])
        if len(index) < 2:
            continue
        per_class[label], pairs[label] = mean_pairwise_ms_ssim(images[index], max_pairs, seed=seed)
    if not per_class:
        raise ValueError("diversity needs a class with at least 2 images")
    return Diversity(per_class, pairs)
