"""Metrics as pure functions of tensors or feature arrays: reconstruction quality (PSNR, SSIM,
MS-SSIM), distribution metrics (FID, KID, precision/recall, density/coverage) with half-sample
bootstrap intervals, diversity and the memorisation audit, the intensity check of stored values
(:mod:`medfusion.metrics.intensity`), plus streaming torchmetrics ``Metric``s for large sets."""

from medfusion.metrics.distribution import (
    KID,
    DensityCoverage,
    FeatureStatistics,
    Interval,
    MemorisationAudit,
    PrecisionRecall,
    bootstrap_interval,
    bootstrap_intervals,
    density_coverage,
    feature_statistics,
    fid,
    frechet_distance,
    kid,
    memorisation_audit,
    nearest_neighbours,
    precision_recall,
)
from medfusion.metrics.diversity import Diversity, diversity, mean_pairwise_ms_ssim
from medfusion.metrics.intensity import compare_intensities, intensity_values, wasserstein_1
from medfusion.metrics.streaming import FeatureStatisticsMetric, StreamingFID

__all__ = [
    "KID",
    "DensityCoverage",
    "Diversity",
    "FeatureStatistics",
    "FeatureStatisticsMetric",
    "Interval",
    "MemorisationAudit",
    "PrecisionRecall",
    "StreamingFID",
    "bootstrap_interval",
    "bootstrap_intervals",
    "compare_intensities",
    "density_coverage",
    "diversity",
    "feature_statistics",
    "fid",
    "frechet_distance",
    "intensity_values",
    "kid",
    "mean_pairwise_ms_ssim",
    "memorisation_audit",
    "nearest_neighbours",
    "precision_recall",
    "wasserstein_1",
]
