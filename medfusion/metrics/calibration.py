"""What a yardstick can see: known degradations of real images scored like a synthetic set.

``medfusion evaluate --calibrate`` takes the real-vs-real reference of the evaluation (the
held-out real images against as many training images, or one half of the held-out images
against the other), degrades the second set in known ways (:mod:`medfusion.metrics.degradations`)
and scores each degraded set against the same real images with the same feature extractor: the
FID as a multiple of the real-vs-real FID, precision, recall, density and coverage, and for exact
copies of the training images the share that the memorisation audit flags. A yardstick that
cannot tell blurred, noisy or shuffled images from real ones cannot vouch for synthetic ones; the
checks below say what it must see, and the report shows them as "what this yardstick can see".
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from medfusion.data.dataset import ImageFolderDataset
from medfusion.metrics.degradations import DEGRADATIONS
from medfusion.metrics.distribution import memorisation_audit
from medfusion.metrics.features import FeatureExtractor

MAX_IMAGES = 1000  # images per set at most (a seeded draw of the reference's)


@dataclass(frozen=True)
class Check:
    """A degradation the yardstick must see: ``metric`` of ``degradation`` compared with ``threshold``."""

    degradation: str
    metric: str  # fid_ratio, precision, ... or flagged (copies)
    comparison: str  # ">=" or "<="
    threshold: float

    def passes(self, value: float) -> bool:
        return {">=": operator.ge, "<=": operator.le}[self.comparison](value, self.threshold)

    def text(self) -> str:
        names = {"fid_ratio": "FD / real-vs-real", "flagged": "share flagged"}
        return (
            f"{self.degradation}: {names.get(self.metric, self.metric)} {self.comparison} {self.threshold:g}"
        )


CHECKS = (
    Check("blur_2", "fid_ratio", ">=", 2.0),
    Check("shuffle", "fid_ratio", ">=", 5.0),
    Check("noise", "fid_ratio", ">=", 20.0),
    Check("noise", "precision", "<=", 0.2),
    Check("copies", "flagged", ">=", 0.95),
)


def _images(dataset: ImageFolderDataset, rows: torch.Tensor, batch_size: int):
    for start in range(0, len(rows), batch_size):
        yield torch.stack([dataset[int(i)]["image"] for i in rows[start : start + batch_size]])


def calibrate(
    extractor: FeatureExtractor,
    real: torch.Tensor,
    other_dataset: ImageFolderDataset,
    other_rows: torch.Tensor,
    audit_train: torch.Tensor,
    score: Callable[[torch.Tensor, torch.Tensor], dict[str, float]],
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    quantile: float = 0.01,
    max_images: int = MAX_IMAGES,
    progress: bool = True,
) -> dict:
    """Score every degradation of the images ``other_rows`` of ``other_dataset`` against ``real``.

    Args:
        extractor: the evaluation's feature extractor.
        real: ``(N, D)`` features of the real side of the reference.
        other_dataset: the other side's folder (training images, or the held-out ones for a split).
        other_rows: its images of the reference (as many as ``real``).
        audit_train: ``(M, D)`` features of the images the memorisation audit treats as training
            images (they include ``other_rows``); ``real`` plays the held-out images.
        score: the evaluation's metrics of two feature sets (``fid``, ``precision``, ...).
        max_images: pairs kept at most (a seeded draw).
        seed: of the draw and of the random degradations.

    Returns:
        ``{"n", "reference" (real vs the undegraded images), "degradations": {name: {"description",
        "fid", "fid_ratio", "precision", ...}}, "checks": [...], "passed"}`` (copies: ``flagged``).
    """
    if len(real) != len(other_rows):
        raise ValueError(f"calibrate: {len(real)} real features but {len(other_rows)} images to degrade")
    generator = torch.Generator().manual_seed(seed)
    if len(real) > max_images:
        keep = torch.randperm(len(real), generator=generator)[:max_images].sort().values
        real, other_rows = real[keep], other_rows[keep]
    features: dict[str, list[torch.Tensor]] = {d.name: [] for d in DEGRADATIONS}
    batches = _images(other_dataset, other_rows, batch_size)
    total = -(-len(other_rows) // batch_size)
    for images in tqdm(batches, total=total, desc="calibration", unit="batch", disable=not progress):
        for degradation in DEGRADATIONS:
            degraded = degradation.apply(images, generator)
            features[degradation.name].append(extractor(degraded.to(device)).double().cpu())
    stacked = {name: torch.cat(rows) for name, rows in features.items()}
    reference = score(real, stacked["copies"])
    base = reference.get("fid")
    degradations = {}
    for degradation in DEGRADATIONS:
        entry: dict = {"description": degradation.description}
        if degradation.name == "copies":
            audit = memorisation_audit(audit_train, stacked["copies"], real, quantile=quantile)
            entry |= {"flagged": audit.fraction_flagged, "threshold": audit.threshold}
        else:
            entry |= score(real, stacked[degradation.name])
            if "fid" in entry:
                entry["fid_ratio"] = entry["fid"] / base if base else None
        degradations[degradation.name] = entry
    checks = []
    for check in CHECKS:
        value = degradations[check.degradation].get(check.metric)
        passed = None if value is None else check.passes(value)
        checks.append({"check": check.text(), "value": value, "passed": passed})
    return {
        "n": len(real),
        "reference": reference,
        "degradations": degradations,
        "checks": checks,
        "passed": all(c["passed"] for c in checks),
    }


def summary(calibration: dict) -> list[str]:
    """Lines for the terminal: one per failed check (the yardstick's blind spots), one saying that
    every check passed, or why there was no calibration."""
    if "skipped" in calibration:
        return [f"calibration: none ({calibration['skipped']})"]
    failed = [c for c in calibration["checks"] if not c["passed"]]
    if not failed:
        return [f"calibration: every check passed on {calibration['n']} images (what this yardstick can see)"]
    return [
        f"calibration: this yardstick does not see {c['check']} (got "
        f"{'nothing' if c['value'] is None else format(c['value'], '.3g')}); verdicts on such failures are "
        "weaker than they look"
        for c in failed
    ]
