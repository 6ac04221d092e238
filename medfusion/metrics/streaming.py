"""Streaming metrics for sets too large to hold: torchmetrics ``Metric``s that keep running sums.

``FeatureStatisticsMetric`` accumulates the sum and the sum of outer products of feature batches
in float64 (synchronised across processes by torchmetrics), so FID over millions of images needs
memory for one ``(D, D)`` matrix. ``StreamingFID`` pairs two of them.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from medfusion.metrics.distribution import FeatureStatistics, as_features, frechet_distance


class FeatureStatisticsMetric(Metric):
    """Running mean and covariance of ``(N, D)`` feature batches.

    Args:
        num_features: ``D``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, num_features: int, **kwargs):
        super().__init__(**kwargs)
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1; got {num_features}")
        self.num_features = num_features
        self.add_state("total", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "outer", torch.zeros(num_features, num_features, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor) -> None:
        x = as_features(features).to(self.total.device)
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected features of width {self.num_features}; got {x.shape[1]}")
        self.total += x.sum(0)
        self.outer += x.T @ x
        self.count += x.shape[0]

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, covariance)`` over every batch of every process (float64)."""
        n = float(self.count)
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors; got {int(n)}")
        mean = self.total / n
        return mean, (self.outer - n * torch.outer(mean, mean)) / (n - 1)

    def statistics(self) -> FeatureStatistics:
        """:meth:`compute` as :class:`FeatureStatistics` (for :func:`frechet_distance`)."""
        mean, cov = self.compute()
        return FeatureStatistics(mean, cov, int(self.count))


class StreamingFID(Metric):
    """FID between a stream of real and a stream of synthetic feature batches."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, num_features: int, **kwargs):
        super().__init__(**kwargs)
        self.real = FeatureStatisticsMetric(num_features, **kwargs)
        self.fake = FeatureStatisticsMetric(num_features, **kwargs)

    def update(self, features: torch.Tensor, real: bool) -> None:
        (self.real if real else self.fake).update(features)

    def forward(self, features: torch.Tensor, real: bool) -> None:
        """Accumulate only: an FID of one batch (one side) means nothing, and torchmetrics' default
        forward would reset the child metrics that hold the sums."""
        self.update(features, real)

    def compute(self) -> torch.Tensor:
        return torch.tensor(
            frechet_distance(self.real.statistics(), self.fake.statistics()), dtype=torch.float64
        )

    def reset(self) -> None:
        super().reset()
        self.real.reset()
        self.fake.reset()
