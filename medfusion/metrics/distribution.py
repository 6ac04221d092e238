"""Distribution metrics as pure functions of feature arrays: FID, KID, precision/recall,
density/coverage, the memorisation audit, and half-sample bootstrap intervals of any of them.

Every function takes ``(N, D)`` feature arrays (numpy or torch; the features of real, synthetic or
training images from one extractor) and computes in float64 on the CPU or the arrays' device.
Nearest-neighbour searches run over blocks of rows, so memory grows with ``block_size * N``, never
with ``N * N``.

References: FID, Heusel et al. 2017; KID, Bińkowski et al. 2018 (unbiased MMD², cubic polynomial
kernel ``(x·y / D + 1)^3``); improved precision and recall, Kynkäänniemi et al. 2019 (k-NN
manifolds, k = 3); density and coverage, Naeem et al. 2020 (k = 5); half-sampling, McCarthy 1969
(the variance of a half-sample mean is that of the full-sample mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

# rows per block of a nearest-neighbour search: a block holds block_size x N distances
BLOCK_SIZE = 1024
# a point this close (relative) to a k-NN ball's edge counts as inside: exact copies sit on the
# edge, and the matrix-product distances carry rounding of about 1e-8 relative
EDGE_TOLERANCE = 1e-6


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(len(a), len(b))``, always by the matrix-product formula (fast), so
    that a pair's distance does not depend on the block it is computed in."""
    return torch.cdist(a, b, compute_mode="use_mm_for_euclid_dist")


def as_features(features, name: str = "features") -> torch.Tensor:
    """``features`` as a float64 ``(N, D)`` tensor; raises naming ``name`` on a bad shape or NaNs."""
    x = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must be an (N, D) array with N, D >= 1; got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


def _same_width(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{names}: features of different widths ({a.shape[1]} vs {b.shape[1]}); use one extractor"
        )


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean ``(D,)`` and covariance ``(D, D)`` (float64) of ``n`` feature vectors."""

    mean: torch.Tensor
    cov: torch.Tensor
    n: int


def feature_statistics(features) -> FeatureStatistics:
    """Mean and unbiased covariance of ``(N, D)`` features (N >= 2)."""
    x = as_features(features)
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors; got {x.shape[0]}")
    mean = x.mean(0)
    centred = x - mean
    return FeatureStatistics(mean, centred.T @ centred / (x.shape[0] - 1), x.shape[0])


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """Fréchet distance of two Gaussians: ``|μa - μb|² + tr(Σa + Σb - 2 (Σa^½ Σb Σa^½)^½)``.

    ``tr((Σa Σb)^½)`` is computed as the sum of the square roots of the eigenvalues of the
    symmetric positive semi-definite ``Σa^½ Σb Σa^½`` (the same eigenvalues), in float64.
    """
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"statistics of different widths ({a.mean.shape[0]} vs {b.mean.shape[0]})")
    root_a = _sqrtm_psd(a.cov.double())
    middle = root_a @ b.cov.double() @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    difference = a.mean.double() - b.mean.double()
    value = (
        difference @ difference + torch.trace(a.cov.double()) + torch.trace(b.cov.double()) - 2 * trace_sqrt
    )
    return float(value.clamp_min(0))


def _fid_in_sample_space(x: torch.Tensor, y: torch.Tensor) -> float:
    """The Fréchet distance from the centred rows: with ``A = (x - μx) / √(Nx - 1)`` (so that
    ``Σx = AᵀA``) and ``B`` alike, ``tr((Σx Σy)^½)`` is the nuclear norm of ``A Bᵀ`` (the eigenvalues
    of ``AᵀA BᵀB`` are the squared singular values of ``A Bᵀ``): ``(Nx, Ny)`` work instead of ``(D, D)``."""
    a = (x - x.mean(0)) / math.sqrt(x.shape[0] - 1)  # (Nx, D)
    b = (y - y.mean(0)) / math.sqrt(y.shape[0] - 1)  # (Ny, D)
    trace_sqrt = torch.linalg.svdvals(a @ b.T).sum()
    difference = x.mean(0) - y.mean(0)
    value = difference @ difference + (a * a).sum() + (b * b).sum() - 2 * trace_sqrt
    return float(value.clamp_min(0))


def fid(real, fake) -> float:
    """Fréchet distance between the feature distributions of ``real`` and ``fake`` ``(N, D)``.

    Sets smaller than their width (e.g. a class of 64 images in 2048-wide Inception features) are
    computed from their rows, in ``(N, N)`` matrices; larger ones from the ``(D, D)`` covariances.
    Both are exact; they agree to rounding.
    """
    shapes = np.shape(real), np.shape(fake)  # no float64 copies yet: large sets take one at a time
    if all(len(shape) == 2 and 2 <= shape[0] < shape[1] for shape in shapes):
        x, y = as_features(real, "real features"), as_features(fake, "fake features")
        _same_width(x, y, "fid")
        return _fid_in_sample_space(x, y)
    return frechet_distance(feature_statistics(real), feature_statistics(fake))


@dataclass(frozen=True)
class KID:
    """Kernel inception distance: the mean and standard deviation of the unbiased MMD² over subsets."""

    mean: float
    std: float
    subsets: int
    subset_size: int


def _polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² with the kernel ``(x·y / D + 1)^3`` (diagonals left out of the within-set means)."""
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    m, n = x.shape[0], y.shape[0]
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2 * k_xy.mean()


def kid(real, fake, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> KID:
    """Kernel inception distance (unbiased; Bińkowski et al. 2018) over random subsets.

    Args:
        real, fake: ``(N, D)`` features.
        subsets: number of random subset pairs.
        subset_size: items per subset (capped at the smaller set's size; >= 2).
        seed: seed of the subset draws.
    """
    x, y = as_features(real, "real features"), as_features(fake, "fake features")
    _same_width(x, y, "kid")
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2 or subsets < 1:
        raise ValueError(f"kid needs subset_size >= 2 and subsets >= 1; got {size} and {subsets}")
    generator = torch.Generator().manual_seed(seed)
    values = torch.stack(
        [
            _polynomial_mmd2(
                x[torch.randperm(x.shape[0], generator=generator)[:size].to(x.device)],
                y[torch.randperm(y.shape[0], generator=generator)[:size].to(y.device)],
            )
            for _ in range(subsets)
        ]
    )
    std = float(values.std()) if subsets > 1 else 0.0
    return KID(float(values.mean()), std, subsets, size)


def _kth_neighbour_distances(x: torch.Tensor, k: int, block_size: int) -> torch.Tensor:
    """Distance from every row of ``x`` to its k-th nearest other row (the k-NN ball radius)."""
    if x.shape[0] <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} feature vectors; got {x.shape[0]}")
    radii = []
    for start in range(0, x.shape[0], block_size):
        distances = _distances(x[start : start + block_size], x)  # (block, N)
        # the k+1 smallest include the row itself at distance 0
        radii.append(distances.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


@dataclass(frozen=True)
class _Membership:
    """Which points lie in which k-NN balls, reduced both ways."""

    inside_any: torch.Tensor  # (points,) inside at least one ball
    counts: torch.Tensor  # (points,) how many balls contain the point
    hit: torch.Tensor  # (centres,) the ball contains at least one point


def _ball_membership(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block_size: int):
    """One block-wise pass over the point-to-centre distances (the distance matrix never whole)."""
    edges = radii[None, :] * (1 + EDGE_TOLERANCE)
    inside_any, counts = [], []
    hit = torch.zeros(centres.shape[0], dtype=torch.bool, device=centres.device)
    for start in range(0, points.shape[0], block_size):
        inside = _distances(points[start : start + block_size], centres) <= edges  # (block, M)
        inside_any.append(inside.any(dim=1))
        counts.append(inside.sum(dim=1))
        hit |= inside.any(dim=0)
    return _Membership(torch.cat(inside_any), torch.cat(counts), hit)


@dataclass(frozen=True)
class PrecisionRecall:
    """Improved precision (fidelity) and recall (coverage of the real distribution), in [0, 1]."""

    precision: float
    recall: float
    k: int


def precision_recall(real, fake, k: int = 3, block_size: int = BLOCK_SIZE) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    The real manifold is the union of balls around every real feature with the distance to its
    k-th nearest real neighbour as radius; precision is the fraction of synthetic features inside
    it. Recall swaps the roles.
    """
    x, y = as_features(real, "real features"), as_features(fake, "fake features")
    _same_width(x, y, "precision_recall")
    real_radii = _kth_neighbour_distances(x, k, block_size)
    fake_radii = _kth_neighbour_distances(y, k, block_size)
    precision = _ball_membership(y, x, real_radii, block_size).inside_any.double().mean()
    recall = _ball_membership(x, y, fake_radii, block_size).inside_any.double().mean()
    return PrecisionRecall(float(precision), float(recall), k)


@dataclass(frozen=True)
class DensityCoverage:
    """Density (can exceed 1: synthetic samples crowd the real ones) and coverage in [0, 1]."""

    density: float
    coverage: float
    k: int


def density_coverage(real, fake, k: int = 5, block_size: int = BLOCK_SIZE) -> DensityCoverage:
    """Density and coverage (Naeem et al. 2020): real k-NN balls, counted by synthetic features.

    density = mean over synthetic features of (real balls containing it) / k;
    coverage = fraction of real balls that contain at least one synthetic feature.
    """
    x, y = as_features(real, "real features"), as_features(fake, "fake features")
    _same_width(x, y, "density_coverage")
    radii = _kth_neighbour_distances(x, k, block_size)
    membership = _ball_membership(y, x, radii, block_size)
    density = membership.counts.double().mean() / k
    return DensityCoverage(float(density), float(membership.hit.double().mean()), k)


def nearest_neighbours(
    queries, references, block_size: int = BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to and index of the nearest reference for every query, ``(N,)`` each."""
    q, r = as_features(queries, "queries"), as_features(references, "references")
    _same_width(q, r, "nearest_neighbours")
    distances, indices = [], []
    for start in range(0, q.shape[0], block_size):
        values, index = _distances(q[start : start + block_size], r).min(dim=1)
        distances.append(values)
        indices.append(index)
    return torch.cat(distances), torch.cat(indices)


@dataclass(frozen=True)
class MemorisationAudit:
    """Nearest-training-image distances of synthetic and of held-out real images.

    Attributes:
        fake_to_train: ``(M,)`` distance of every synthetic sample to its nearest training image.
        fake_nearest: ``(M,)`` index of that training image.
        heldout_to_train: ``(H,)`` the same for held-out real images (what "new" looks like).
        threshold: the ``quantile`` of ``heldout_to_train``.
        quantile: e.g. 0.01 (the 1st percentile).
        fraction_flagged: fraction of synthetic samples closer to a training image than ``threshold``.
        closest: ``(synthetic index, training index, distance)`` of the closest pairs, closest first.
    """

    fake_to_train: torch.Tensor
    fake_nearest: torch.Tensor
    heldout_to_train: torch.Tensor
    threshold: float
    quantile: float
    fraction_flagged: float
    closest: tuple[tuple[int, int, float], ...]

    @property
    def flagged(self) -> torch.Tensor:
        """Indices of the synthetic samples closer to a training image than the threshold."""
        return torch.nonzero(self.fake_to_train < self.threshold).flatten()


def memorisation_audit(
    train, fake, heldout, quantile: float = 0.01, top: int = 8, block_size: int = BLOCK_SIZE
) -> MemorisationAudit:
    """Is any synthetic sample a (near) copy of a training image?

    For every synthetic sample the distance to its nearest training image is compared with the
    same distance for held-out real images, which the model never saw: a synthetic sample closer
    than the ``quantile`` of the held-out distances is flagged.

    Args:
        train, fake, heldout: ``(N, D)`` features of the training, synthetic and held-out images.
        quantile: in (0, 1); 0.01 flags samples closer than 99% of held-out images.
        top: how many closest pairs to return.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1); got {quantile}")
    fake_to_train, fake_nearest = nearest_neighbours(fake, train, block_size)
    heldout_to_train, _ = nearest_neighbours(heldout, train, block_size)
    threshold = float(torch.quantile(heldout_to_train, quantile))
    order = torch.argsort(fake_to_train)[: max(0, top)]
    closest = tuple((int(i), int(fake_nearest[i]), float(fake_to_train[i])) for i in order)
    flagged = float((fake_to_train < threshold).double().mean())
    return MemorisationAudit(
        fake_to_train, fake_nearest, heldout_to_train, threshold, quantile, flagged, closest
    )


# the range of each metric, for the ends of its intervals
BOUNDS: dict[str, tuple[float, float]] = {
    "fid": (0.0, math.inf),
    "kid": (-math.inf, math.inf),
    "precision": (0.0, 1.0),
    "recall": (0.0, 1.0),
    "density": (0.0, math.inf),
    "coverage": (0.0, 1.0),
}


@dataclass(frozen=True)
class Interval:
    """A two-sided interval of a metric: ``low`` to ``high`` at ``level`` (e.g. 0.9: the 5th to the
    95th percentile) from ``resamples`` half-samples."""

    low: float
    high: float
    level: float
    resamples: int

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high


def bootstrap_intervals(
    metric_fn: Callable[[torch.Tensor, torch.Tensor], Mapping[str, float]],
    real,
    fake,
    n_resamples: int = 200,
    seed: int = 0,
    level: float = 0.9,
    bounds: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, Interval]:
    """Percentile intervals of every metric ``metric_fn(real, fake)`` returns, by half-sampling.

    Each resample draws half of the rows of ``real`` and half of ``fake`` without replacement
    (independently, seeded) and evaluates ``metric_fn`` on them; the interval is the ``level``
    percentile interval of those values, moved so that their median sits on the value of the full
    sets. Half-samples, not draws with replacement: a drawn-twice row is its own nearest neighbour,
    which shrinks the k-NN balls of precision/recall/density/coverage and pulls every resample
    below the estimate; a half-sample mean varies as much as the full-sample mean does. The
    interval is one for what a fresh draw of the same sizes would score (FID's small-sample bias is
    kept: compare it with a reference at the same sizes).

    Args:
        metric_fn: ``(real, fake) -> {name: value}``; keys it cannot compute at half the sizes
            (too few rows) get no interval.
        real, fake: ``(N, D)`` features, N >= 4 each.
        n_resamples: half-samples, >= 10.
        seed: seed of the draws; the same seed gives the same intervals.
        level: in (0, 1); 0.9 gives the 5th to the 95th percentile.
        bounds: ``{name: (low, high)}``, the range the interval ends are clipped to (default
            ``BOUNDS``).

    Returns:
        ``{name: Interval}`` for every key of the half-sample results.
    """
    x, y = as_features(real, "real features"), as_features(fake, "fake features")
    _same_width(x, y, "bootstrap_intervals")
    if n_resamples < 10:
        raise ValueError(f"n_resamples must be >= 10; got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level}")
    if min(x.shape[0], y.shape[0]) < 4:
        raise ValueError(
            f"half-samples need at least 4 feature vectors per set; got {x.shape[0]} and {y.shape[0]}"
        )
    bounds = BOUNDS if bounds is None else bounds
    estimate = metric_fn(x, y)
    generator = torch.Generator().manual_seed(seed)
    values: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        rows_x = torch.randperm(x.shape[0], generator=generator)[: x.shape[0] // 2].to(x.device)
        rows_y = torch.randperm(y.shape[0], generator=generator)[: y.shape[0] // 2].to(y.device)
        for key, value in metric_fn(x[rows_x], y[rows_y]).items():
            values.setdefault(key, []).append(float(value))
    tail = (1.0 - level) / 2
    intervals = {}
    for key, samples in values.items():
        if key not in estimate or len(samples) != n_resamples:
            continue
        spread = torch.tensor(samples, dtype=torch.float64)
        low, median, high = torch.quantile(spread, torch.tensor([tail, 0.5, 1.0 - tail], dtype=torch.float64))
        floor, ceiling = bounds.get(key, (-math.inf, math.inf))
        centre = float(estimate[key])
        intervals[key] = Interval(
            min(max(centre + float(low - median), floor), ceiling),
            max(min(centre + float(high - median), ceiling), floor),
            level,
            n_resamples,
        )
    return intervals


def bootstrap_interval(
    metric_fn: Callable[[torch.Tensor, torch.Tensor], float],
    real,
    fake,
    n_resamples: int = 200,
    seed: int = 0,
    level: float = 0.9,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> Interval:
    """The half-sample percentile interval of one metric ``metric_fn(real, fake) -> float`` (see
    ``bootstrap_intervals``; ``bounds`` clips its ends)."""
    intervals = bootstrap_intervals(
        lambda x, y: {"value": metric_fn(x, y)}, real, fake, n_resamples, seed, level, {"value": bounds}
    )
    return intervals["value"]
