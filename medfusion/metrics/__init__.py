"""Metrics as pure functions of tensors or feature arrays: reconstruction quality (PSNR, SSIM,
MS-SSIM), distribution metrics (FID, KID, precision/recall, density/coverage), diversity and the
memorisation audit, plus streaming torchmetrics ``Metric``s for large sets."""

from medfusion.metrics.distribution import (
    KID,
    DensityCoverage,
    FeatureStatistics,
    MemorisationAudit,
    PrecisionRecall,
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
from medfusion.metrics.streaming import FeatureStatisticsMetric, StreamingFID

__all__ = [
    "KID",
    "DensityCoverage",
    "Diversity",
    "FeatureStatistics",
    "FeatureStatisticsMetric",
    "MemorisationAudit",
    "PrecisionRecall",
    "StreamingFID",
    "density_coverage",
    "diversity",
    "feature_statistics",
    "fid",
    "frechet_distance",
    "kid",
    "mean_pairwise_ms_ssim",
    "memorisation_audit",
    "nearest_neighbours",
    "precision_recall",
]
