"""``medfusion evaluate``: real vs synthetic folders -> ``metrics.json`` and ``report.html``.

Both folders are read the same way (the data readers, one intensity normalisation, one size),
passed through one feature extractor, and compared overall and per class: FID, KID, precision /
recall, density / coverage, diversity (pairwise MS-SSIM within each class, real and synthetic),
and with ``train`` the memorisation audit (synthetic vs held-out real distances to the
training images). Every number names the extractor that produced it.

Every metric is also computed for real against real at the same n (the held-out images against
as many training images, or one half of the held-out images against the other), beside the
synthetic value at that n; FID, precision, recall, density and coverage get half-sample bootstrap
intervals, and the real-vs-real interval is the band a synthetic set is judged against.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medfusion import __version__
from medfusion.config import DataConfig
from medfusion.data.dataset import ImageFolderDataset, open_alike
from medfusion.metrics.calibration import calibrate as run_calibration
from medfusion.metrics.calibration import summary as calibration_summary
from medfusion.metrics.distribution import (
    BOUNDS,
    bootstrap_intervals,
    density_coverage,
    fid,
    kid,
    memorisation_audit,
    precision_recall,
)
from medfusion.metrics.diversity import diversity
from medfusion.metrics.features import FeatureExtractor
from medfusion.metrics.intensity import compare_intensities, read_intensities
from medfusion.runlock import run_lock
from medfusion.utils import atomic_write_text

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
HEADLINE = (("fid", "FID"), ("kid", "KID"), ("precision", "precision"), ("recall", "recall"))
KEEP_PER_CLASS = 64  # images kept per class and set, for the diversity score and the grids
FEW_IMAGES = 50  # below this many real or synthetic images a class's FID gets a warning
DISTANCES = ("fid", "kid")  # lower is better: compared with the reference by their ratio
BAND_METRICS = ("precision", "recall", "density", "coverage")  # compared by their difference
BOOTSTRAP_RESAMPLES = 200
BOOTSTRAP_LEVEL = 0.9
MIN_RESAMPLES = 50  # fewer half-samples than this give no interval
# estimated floating-point operations of one set of intervals (about 10 s on one CPU core); larger
# sets get fewer half-samples, and none below MIN_RESAMPLES
BOOTSTRAP_BUDGET = 2e11
BOOTSTRAP_METHOD = (
    "half-sampling: each resample draws half of the real and half of the synthetic features without "
    "replacement (seeded); the interval is the percentile interval of the resampled values, moved so "
    "that their median sits on the value of the full sets"
)
REFERENCE_TRAIN = (
    "per class, the held-out real images against as many training images drawn without replacement "
    "(seeded); the synthetic value beside it: the same real images against as many synthetic images "
    "drawn likewise (n: the smallest of the three, all other images drawn to it); overall: the classes "
    "together"
)
REFERENCE_SPLIT = (
    "per class, one half of the held-out real images against the other half (a seeded split); the "
    "synthetic value beside it: the first half against as many synthetic images drawn without "
    "replacement; overall: the classes together"
)
BAND = (
    "the synthetic value at the reference's n lies within the real-vs-real band when FID is at most "
    "the upper end of the real-vs-real interval, precision, recall and coverage at least its lower end, "
    "density inside it; KID and diversity are shown as ratios only"
)


@dataclass(frozen=True)
class ImageSet:
    """Features of a folder, with labels and a few images kept for grids and diversity."""

    folder: str
    dataset: ImageFolderDataset
    features: torch.Tensor  # (N, D) float64
    labels: tuple[str | None, ...]
    kept: dict[str | None, torch.Tensor]  # per class: (K, C, *spatial) in [-1, 1]

    @property
    def classes(self) -> list[str | None]:
        return sorted(set(self.labels), key=str)


def read_image_set(
    dataset: ImageFolderDataset,
    extractor: FeatureExtractor,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> ImageSet:
    """Extract the features of every item of ``dataset`` (a folder opened with its transform)."""
    names = dataset.class_names
    features, labels, kept = [], [], {}
    loader = DataLoader(dataset, batch_size=batch_size)
    folder = str(dataset.root)
    for batch in tqdm(loader, desc=f"features {Path(folder).name}", unit="batch", disable=not progress):
        images = batch["image"]
        features.append(extractor(images.to(device)).double().cpu())
        for image, label in zip(images, batch["label"].tolist()):
            name = names[label] if label >= 0 else None
            labels.append(name)
            held = kept.setdefault(name, [])
            if len(held) < KEEP_PER_CLASS:
                held.append(image)
    stacked = {name: torch.stack(images) for name, images in kept.items()}
    return ImageSet(folder, dataset, torch.cat(features), tuple(labels), stacked)


def _rows(labels: tuple[str | None, ...], label: str | None) -> torch.Tensor:
    """Indices of the rows of class ``label``; None: every row."""
    if label is None:
        return torch.arange(len(labels))
    return torch.tensor([i for i, value in enumerate(labels) if value == label], dtype=torch.long)


def point_metrics(real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """FID, precision/recall and density/coverage of two feature sets, as far as their sizes allow
    (the metrics that get intervals)."""
    out: dict[str, float] = {}
    if min(len(real), len(fake)) >= 2:
        out["fid"] = fid(real, fake)
    if min(len(real), len(fake)) > 3:
        pr = precision_recall(real, fake, k=3)
        out["precision"], out["recall"] = pr.precision, pr.recall
    if min(len(real), len(fake)) > 5:
        dc = density_coverage(real, fake, k=5)
        out["density"], out["coverage"] = dc.density, dc.coverage
    return out


def distribution_metrics(real: torch.Tensor, fake: torch.Tensor, kid_subsets: int = 100) -> dict:
    """FID, KID, precision/recall and density/coverage of two feature sets (what their sizes allow)."""
    out: dict = {"n_real": int(real.shape[0]), "n_fake": int(fake.shape[0])}
    points = point_metrics(real, fake)
    if "fid" in points:
        out["fid"] = points.pop("fid")
        score = kid(real, fake, subsets=kid_subsets, subset_size=1000)
        out["kid"], out["kid_std"], out["kid_subset_size"] = score.mean, score.std, score.subset_size
    return {**out, **points}


def bootstrap_resamples(n_real: int, n_fake: int, dim: int, requested: int = BOOTSTRAP_RESAMPLES) -> int:
    """How many half-samples the intervals of ``n_real`` vs ``n_fake`` features of width ``dim`` get:
    ``requested``, fewer where the estimated work would pass ``BOOTSTRAP_BUDGET``, and 0 (no
    intervals) where fewer than ``MIN_RESAMPLES`` fit or a half-sample is too small."""
    m_real, m_fake = n_real // 2, n_fake // 2
    if requested <= 0 or min(m_real, m_fake) < 2:
        return 0
    # block-wise distances: 2 m_a m_b D operations per pair of sets (k-NN radii and memberships)
    neighbours = 2 * dim * (2 * m_real**2 + m_fake**2 + 3 * m_real * m_fake)
    if max(m_real, m_fake) < dim:  # fid from the rows: a cross product and its singular values
        frechet = 2 * m_real * m_fake * dim + 4 * min(m_real, m_fake) ** 2 * max(m_real, m_fake)
    else:  # from the covariances: two products and two eigen-decompositions
        frechet = 2 * (m_real + m_fake) * dim**2 + 20 * dim**3
    fit = int(BOOTSTRAP_BUDGET // (neighbours + frechet))
    resamples = min(requested, fit)
    return resamples if resamples >= min(MIN_RESAMPLES, requested) else 0


def compare(
    real: torch.Tensor,
    fake: torch.Tensor,
    kid_subsets: int = 100,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = BOOTSTRAP_LEVEL,
) -> dict:
    """``distribution_metrics`` of ``real`` vs ``fake`` with ``interval`` (``{metric: [low, high]}``,
    half-sample percentile intervals at ``level``) and ``interval_resamples`` (0: none; see
    ``bootstrap_resamples``)."""
    out = distribution_metrics(real, fake, kid_subsets)
    count = bootstrap_resamples(len(real), len(fake), real.shape[1], resamples)
    intervals = bootstrap_intervals(point_metrics, real, fake, count, seed, level, BOUNDS) if count else {}
    out["interval"] = {key: [value.low, value.high] for key, value in intervals.items()}
    out["interval_resamples"] = count
    return out


def reference_draws(
    real_labels: tuple[str | None, ...],
    fake_labels: tuple[str | None, ...],
    other_labels: tuple[str | None, ...] | None,
    strata: list[str | None],
    seed: int = 0,
) -> dict[str | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Rows for the real-vs-real reference: per stratum (a class; None: every row) the rows of the
    real set (A), of the other real set (B) and of the synthetic set (F), ``n`` each, seeded.

    With ``other_labels`` (the training images) A is the real class, B as many training images of
    the class drawn without replacement; without, A and B are the two halves of a random split of
    the real class. F is as many synthetic images of the class drawn without replacement; ``n``
    is the smallest of the three pools. Strata with fewer than 2 rows each are left out.

    Returns:
        ``{stratum: (rows of real, rows of the other set, rows of fake)}``, each sorted.
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(rows: torch.Tensor, n: int) -> torch.Tensor:
        if n >= len(rows):
            return rows
        return rows[torch.randperm(len(rows), generator=generator)[:n]].sort().values

    draws = {}
    for stratum in strata:
        real_rows, fake_rows = _rows(real_labels, stratum), _rows(fake_labels, stratum)
        if other_labels is None:
            shuffled = real_rows[torch.randperm(len(real_rows), generator=generator)]
            half = len(real_rows) // 2
            n = min(half, len(fake_rows))
            a, b = shuffled[:n].sort().values, shuffled[half : half + n].sort().values
        else:
            other_rows = _rows(other_labels, stratum)
            n = min(len(real_rows), len(other_rows), len(fake_rows))
            a, b = draw(real_rows, n), draw(other_rows, n)
        if n >= 2:
            draws[stratum] = (a, b, draw(fake_rows, n))
    return draws


def shared_classes(real_labels: tuple[str | None, ...], fake_labels: tuple[str | None, ...]) -> list[str]:
    """The classes both sets hold, sorted."""
    real_classes = {c for c in real_labels if c is not None}
    return sorted(real_classes & {c for c in fake_labels if c is not None})


def all_reference_draws(
    real_labels: tuple[str | None, ...],
    fake_labels: tuple[str | None, ...],
    train_labels: tuple[str | None, ...] | None,
    seed: int = 0,
) -> tuple[dict[str | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], bool]:
    """:func:`reference_draws` per shared class and overall (None: the classes' draws together),
    against the training images where every shared class has at least 2 of them, else a split of
    the real images. Returns the draws and whether they use the training images."""
    shared = shared_classes(real_labels, fake_labels)
    strata: list[str | None] = list(shared) or [None]
    use_train = train_labels is not None
    if use_train and shared:
        use_train = all(len(_rows(train_labels, c)) >= 2 for c in shared)
    draws = reference_draws(real_labels, fake_labels, train_labels if use_train else None, strata, seed)
    if shared and draws:  # overall: the classes' draws together
        draws[None] = tuple(torch.cat([draws[c][i] for c in shared if c in draws]) for i in range(3))
    return draws, use_train


def _versus(key: str, synthetic: dict, reference: dict) -> dict:
    """One metric of the synthetic draw beside the real-vs-real value, at the same n."""
    value, base = synthetic[key], reference[key]
    out: dict = {"value": value}
    if key in synthetic["interval"]:
        out["interval"] = synthetic["interval"][key]
    out["reference"] = base
    band = reference["interval"].get(key)
    if band is not None:
        out["reference_interval"] = band
    if key in DISTANCES:  # KID is unbiased and can be negative: no ratio there
        out["ratio"] = value / base if base > 0 and value >= 0 else None
    out["difference"] = value - base
    if band is None:
        out["within_band"] = None
    elif key in DISTANCES:
        out["within_band"] = bool(value <= band[1])
    elif key == "density":
        out["within_band"] = bool(band[0] <= value <= band[1])
    else:
        out["within_band"] = bool(value >= band[0])
    return out


def _reference(
    real: torch.Tensor, other: torch.Tensor, fake: torch.Tensor, same: dict | None, **options
) -> dict:
    """The real-vs-real reference (``real`` vs ``other``) and the synthetic value at the same n
    (``real`` vs ``fake``; ``same``: already computed)."""
    reference = compare(real, other, **options)
    synthetic = same if same is not None else compare(real, fake, **options)
    out: dict = {"n_real": len(real), "n_other": len(other), "n_fake": len(fake)}
    for key in (*DISTANCES, *BAND_METRICS):
        if key in reference and key in synthetic:
            out[key] = _versus(key, synthetic, reference)
    return out


def check_interval_options(resamples: int, level: float) -> None:
    """Raise ``ValueError`` unless ``resamples`` is 0 (no intervals) or >= 10 and ``level`` in (0, 1)."""
    if resamples != 0 and resamples < 10:
        raise ValueError(f"resamples must be 0 (no intervals) or >= 10; got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level}")


def compare_features(
    real: torch.Tensor,
    real_labels: tuple[str | None, ...],
    fake: torch.Tensor,
    fake_labels: tuple[str | None, ...],
    train: torch.Tensor | None = None,
    train_labels: tuple[str | None, ...] | None = None,
    kid_subsets: int = 100,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = 0,
) -> dict:
    """Every distribution metric of ``fake`` against ``real``, overall and per shared class, each
    with its interval and beside its real-vs-real reference at the same n.

    Args:
        real, fake, train: ``(N, D)`` features of the held-out real, synthetic and (optional)
            training images; ``*_labels`` one class (or None) per row.
        kid_subsets: subsets of every KID estimate.
        resamples: half-samples per set of intervals (fewer for large sets; 0: no intervals).
        level: of the intervals, in (0, 1).
        seed: of the reference draws and the half-samples.

    Returns:
        ``{"overall": ..., "per_class": {...}, "reference": ..., "bootstrap": ..., "warnings": [...],
        "verdict": ...}`` (the keys of ``metrics.json`` that hold numbers; see ``evaluate``).
    """
    check_interval_options(resamples, level)
    options = {"kid_subsets": kid_subsets, "resamples": resamples, "seed": seed, "level": level}
    shared = shared_classes(real_labels, fake_labels)
    draws, use_train = all_reference_draws(
        real_labels, fake_labels, train_labels if train is not None else None, seed
    )
    other = train if use_train else real

    groups: dict[str, dict] = {}
    warnings: list[str] = []
    for name, label in [("overall", None), *((c, c) for c in shared)]:
        real_rows, fake_rows = _rows(real_labels, label), _rows(fake_labels, label)
        entry = compare(real[real_rows], fake[fake_rows], **options)
        if label in draws:
            a, b, f = draws[label]
            whole = len(a) == len(real_rows) and len(f) == len(fake_rows)
            entry["reference"] = _reference(real[a], other[b], fake[f], entry if whole else None, **options)
        else:
            warnings.append(f"{name}: too few images for a real-vs-real reference")
        smallest = min(entry["n_real"], entry["n_fake"])
        if smallest < FEW_IMAGES:
            warnings.append(
                f"{name}: FID on {smallest} images is not meaningful ({entry['n_real']} real, "
                f"{entry['n_fake']} synthetic; fewer than {FEW_IMAGES}): read it against the "
                "real-vs-real value beside it"
            )
        groups[name] = entry
    overall = groups.pop("overall")
    skipped = [
        name for name, entry in (("overall", overall), *groups.items()) if not entry["interval_resamples"]
    ]
    results = {
        "overall": overall,
        "per_class": groups,
        "reference": {
            "real_vs_real": "train" if use_train else "split",
            "definition": REFERENCE_TRAIN if use_train else REFERENCE_SPLIT,
            "band": BAND,
            "seed": seed,
        },
        "bootstrap": {
            "method": BOOTSTRAP_METHOD,
            "level": level,
            "interval": f"{100 * (1 - level) / 2:g}th to {100 * (1 + level) / 2:g}th percentile",
            "resamples": resamples,
            "min_resamples": MIN_RESAMPLES,
            "budget_operations": BOOTSTRAP_BUDGET,
            "seed": seed,
            "skipped": skipped,
            "skipped_means": "no intervals for these (all images vs all): more work than budget_operations "
            f"allows for {MIN_RESAMPLES} half-samples, or fewer than 4 images a side",
        },
        "warnings": warnings,
    }
    results["verdict"] = verdict(results)
    return results


def open_folders(
    folders: dict[str, str | Path | None], data: DataConfig
) -> tuple[dict[str, ImageFolderDataset], tuple[int, ...]]:
    """Open ``real`` and the other folders given (not None) alike (see
    :func:`~medfusion.data.dataset.open_alike`, ``real`` the reference); errors name each folder by
    its key and path (``fake /data/synthetic: ...``). Returns the datasets and the size."""
    given = {name: folder for name, folder in folders.items() if folder is not None}
    return open_alike(given, data)


def evaluate(
    real: str | Path,
    fake: str | Path,
    out: str | Path,
    extractor: FeatureExtractor,
    train: str | Path | None = None,
    data: DataConfig | None = None,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    kid_subsets: int = 100,
    quantile: float = 0.01,
    progress: bool = True,
    log: Callable[[str], None] = print,
    pipeline: dict | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = 0,
    utility: dict | None = None,
    calibrate: bool = False,
) -> dict:
    """Compare the synthetic folder ``fake`` with the real folder ``real``; write ``out/metrics.json``
    and ``out/report.html``. Returns the metrics (what ``metrics.json`` holds).

    Args:
        real: real reference images (held out from the training of the generator).
        fake: synthetic images (e.g. a ``medfusion sample`` folder).
        out: where the report goes.
        extractor: the feature extractor (named in every result).
        train: the generator's training images, for the memorisation audit; None: no audit.
        data: how files become tensors (normalisation, size); default: ``auto`` normalisation and
            the size of the first real image.
        kid_subsets: subsets of the KID estimate.
        quantile: of the held-out distances, for the memorisation audit.
        pipeline: how the synthetic images were made (e.g. ``medfusion demo``'s stages with their
            timings), kept in ``metrics.json`` and shown in the report.
        resamples: half-samples per set of intervals (fewer for large sets; 0: no intervals).
        level: of the intervals (0.9: the 5th to the 95th percentile).
        seed: of the real-vs-real draws and the half-samples.
        utility: what a classifier trained on the synthetic images does on the real ones, beside
            the same classifier trained on real images (``medfusion.downstream.tstr``'s result),
            kept in ``metrics.json`` as ``tstr`` and shown in the report.
        calibrate: also score known degradations of the real-vs-real reference's images (blur,
            noise, patch shuffle, inversion, copies; :mod:`medfusion.metrics.calibration`), kept
            as ``calibration`` and shown as "what this yardstick can see".

    ``metrics.json`` holds, overall and per class, the metrics of all real vs all synthetic images
    (``n_real``, ``n_fake``, ``fid``, ``kid``, ...) with ``interval`` and ``interval_resamples``,
    and ``reference``: for each metric the synthetic value at the reference's n beside the
    real-vs-real value (``value``, ``interval``, ``reference``, ``reference_interval``, ``ratio`` or
    ``difference``, ``within_band``); top level ``reference`` and ``bootstrap`` say how, ``verdict``
    whether the synthetic set is within the real-vs-real band, ``warnings`` what is not meaningful.
    ``intensity`` compares the values as stored in the files (source units, not normalised), per
    class (:func:`~medfusion.metrics.intensity.compare_intensities`); its warnings (synthetic files
    on another scale than the real ones) join ``warnings``.
    """
    check_interval_options(resamples, level)
    out = Path(out)
    data = data or DataConfig()
    datasets, image_size = open_folders({"real": real, "fake": fake, "train": train}, data)
    with run_lock(out, "medfusion evaluate"):
        sets = {
            name: read_image_set(dataset, extractor, batch_size, device, progress)
            for name, dataset in datasets.items()
        }
        real_set, fake_set = sets["real"], sets["fake"]
        results: dict = {
            "extractor": extractor.name,
            "note": "FIDs from different extractors are not comparable",
            "real": str(real),
            "fake": str(fake),
            "train": str(train) if train is not None else None,
            "image_size": list(image_size),
            "normalization": data.normalization,
            "medfusion_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        train_set = sets.get("train")
        results |= compare_features(
            real_set.features,
            real_set.labels,
            fake_set.features,
            fake_set.labels,
            train_set.features if train_set is not None else None,
            train_set.labels if train_set is not None else None,
            kid_subsets=kid_subsets,
            resamples=resamples,
            level=level,
            seed=seed,
        )
        real_values, fake_values = (  # in the files' own units: a scale mismatch shows here
            read_intensities(datasets[name].samples, seed=seed, progress=progress, skip_bad=data.skip_bad)
            for name in ("real", "fake")
        )
        results["intensity"] = compare_intensities(real_values, fake_values, seed=seed)
        results["warnings"] += results["intensity"]["warnings"]
        results["diversity"] = {
            name: {str(k): v for k, v in diversity(*_kept_images(s)).per_class.items()}
            for name, s in (("real", real_set), ("fake", fake_set))
            if any(len(v) >= 2 for v in s.kept.values())
        }
        _diversity_versus_real(results, real_set, fake_set)
        if pipeline is not None:
            results["pipeline"] = pipeline
        if utility is not None:
            results["tstr"] = utility
        if calibrate:
            results["calibration"] = _calibrate(results, sets, datasets, extractor, batch_size, device, seed,
                                                quantile, progress)  # fmt: skip
        audit = None
        if "train" in sets:
            train_features = sets["train"].features
            audit = memorisation_audit(
                train_features, fake_set.features, real_set.features, quantile=quantile
            )
            results["memorisation"] = {
                "quantile": audit.quantile,
                "threshold": audit.threshold,
                "fraction_flagged": audit.fraction_flagged,
                "flagged": len(audit.flagged),
                "closest": [
                    {"fake": _path(fake_set, i), "train": _path(sets["train"], j), "distance": d}
                    for i, j, d in audit.closest
                ],
            }
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / METRICS_FILE, json.dumps(results, indent=2) + "\n")
        from medfusion.metrics.report import write_report

        write_report(out / REPORT_FILE, results, real_set, fake_set, sets.get("train"), audit)
        lines = [headline(results), *(class_line(k, v) for k, v in results["per_class"].items())]
        lines += [f"warning: {text}" for text in results["warnings"]]
        if "calibration" in results:
            lines += calibration_summary(results["calibration"])
        lines.append(f"wrote {out / METRICS_FILE} and {out / REPORT_FILE}")
        log("\n".join(f"# {line}" for line in lines))
        return results


def _calibrate(results, sets, datasets, extractor, batch_size, device, seed, quantile, progress) -> dict:
    """The calibration of this evaluation's yardstick on its overall real-vs-real reference."""
    real_set, fake_set, train_set = sets["real"], sets["fake"], sets.get("train")
    draws, use_train = all_reference_draws(
        real_set.labels, fake_set.labels, train_set.labels if train_set is not None else None, seed
    )
    if None not in draws:
        return {"skipped": "too few images for a real-vs-real reference"}
    a, b, _ = draws[None]
    other_name = "train" if use_train else "real"
    # the audit's training images: all of them, or for a split the half the copies come from
    audit_train = sets[other_name].features if use_train else real_set.features[b]
    out = run_calibration(
        extractor, real_set.features[a], datasets[other_name], b, audit_train, point_metrics,
        batch_size=batch_size, device=device, seed=seed, quantile=quantile, progress=progress,
    )  # fmt: skip
    out["degraded"] = (
        "training images (the real-vs-real reference's draw)" if use_train
        else "the second half of the held-out real images (the real-vs-real reference's split)"
    )  # fmt: skip
    return out


def significant(value: float | None, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, without an exponent (``0.0123``, ``1.00``, ``257``)."""
    if value is None or not math.isfinite(value):
        return "–" if value is None else str(value)
    if abs(value) < 1e-9:  # 0, or 0 but for rounding (e.g. the FID of a set against itself)
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def interval_text(interval: list[float] | None) -> str:
    """``[low, high]`` to 3 significant digits; empty without an interval."""
    return f" [{significant(interval[0])}, {significant(interval[1])}]" if interval else ""


def verdict(results: dict) -> dict:
    """Whether the synthetic set is within the real-vs-real band (by the overall FID at the
    reference's n; None where there is no band), and the sentence that says so."""
    reference = results["overall"].get("reference")
    if reference is None or "fid" not in reference:
        return {"within_band": None, "text": "no real-vs-real reference (too few images)"}
    entry = reference["fid"]
    n = f"at n = {reference['n_real']} real vs {reference['n_fake']} synthetic"
    compared = (
        f"FID {significant(entry['value'])}{interval_text(entry.get('interval'))} against real vs real "
        f"{significant(entry['reference'])}{interval_text(entry.get('reference_interval'))}"
    )
    ratio = entry.get("ratio")
    times = f"{significant(ratio)}x the real-vs-real value" if ratio is not None else None
    within = entry["within_band"]
    if within is None:
        text = f"no real-vs-real band (no intervals at this size); {n}, {compared}"
        text += f": {times}" if times else ""
    elif within:
        text = f"within the real-vs-real band: {n}, {compared}"
    else:
        upper = entry["reference_interval"][1]
        beyond = f", {significant(entry['value'] / upper)}x its upper end" if upper > 0 else ""
        text = f"outside the real-vs-real band: {n}, {compared}" + (f": {times}{beyond}" if times else "")
    others = [k for k in BAND_METRICS if reference.get(k, {}).get("within_band") is False]
    if others:
        text += f"; {', '.join(others)} outside {'its' if len(others) == 1 else 'their'} band"
    return {"within_band": within, "text": text}


def headline(results: dict) -> str:
    """One line: the extractor, the overall numbers (all images) and the verdict against the
    real-vs-real band."""
    overall = results["overall"]
    parts = [f"{name} {significant(overall[key])}" for key, name in HEADLINE if key in overall]
    line = f"{results['extractor']}: " + ", ".join(parts)
    line += f" ({overall['n_real']} real, {overall['n_fake']} synthetic)"
    if "verdict" in results:
        line += f"; {results['verdict']['text']}"
    return line


def class_line(label: str, values: dict) -> str:
    """One class in one line: FID with its interval and images, beside the real-vs-real value."""
    if "fid" not in values:
        return f"  {label}: too few images ({values['n_real']} real, {values['n_fake']} synthetic)"
    text = (
        f"  {label}: FID {significant(values['fid'])}{interval_text(values['interval'].get('fid'))} "
        f"({values['n_real']} real, {values['n_fake']} synthetic)"
    )
    entry = values.get("reference", {}).get("fid")
    if entry is not None:
        band = {True: "within", False: "outside", None: "no"}[entry["within_band"]]
        ratio = f", {significant(entry['ratio'])}x" if entry.get("ratio") is not None else ""
        text += (
            f"; at n = {values['reference']['n_real']}: FID {significant(entry['value'])} vs real vs real "
            f"{significant(entry['reference'])}{interval_text(entry.get('reference_interval'))}{ratio}, "
            f"{band} band"
        )
    for key in ("precision", "recall"):
        if key in values:
            text += f", {key} {significant(values[key])}"
    return text


def _diversity_versus_real(results: dict, real_set: ImageSet, fake_set: ImageSet) -> None:
    """Per class: the synthetic diversity beside the real one (its reference; mean pairwise MS-SSIM
    does not depend on how many images it averages over)."""
    real_div, fake_div = results["diversity"].get("real", {}), results["diversity"].get("fake", {})
    for label, entry in results["per_class"].items():
        if label in real_div and label in fake_div:
            value, base = fake_div[label], real_div[label]
            entry["diversity"] = {
                "value": value,
                "reference": base,
                "ratio": value / base if base > 0 else None,
                "n_real": len(real_set.kept[label]),
                "n_fake": len(fake_set.kept[label]),
            }


def _kept_images(image_set: ImageSet) -> tuple[torch.Tensor, list]:
    labels, images = [], []
    for label, stack in image_set.kept.items():
        labels += [label] * len(stack)
        images.append(stack)
    return torch.cat(images), labels


def _path(image_set: ImageSet, index: int) -> str:
    return str(image_set.dataset.samples[index].path)
