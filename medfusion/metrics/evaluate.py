"""``medfusion evaluate``: real vs synthetic folders -> ``metrics.json`` and ``report.html``.

Both folders are read the same way (the data readers, one intensity normalisation, one size),
passed through one feature extractor, and compared overall and per class: FID, KID, precision /
recall, density / coverage, diversity (pairwise MS-SSIM within each class, real and synthetic),
and with ``--train`` the memorisation audit (synthetic vs held-out real distances to the
training images). Every number names the extractor that produced it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medfusion import __version__
from medfusion.config import DataConfig
from medfusion.data.dataset import ImageFolderDataset, build_transform
from medfusion.metrics.distribution import density_coverage, fid, kid, memorisation_audit, precision_recall
from medfusion.metrics.diversity import diversity
from medfusion.metrics.features import FeatureExtractor
from medfusion.runlock import run_lock
from medfusion.utils import atomic_write_text

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
HEADLINE = (("fid", "FID"), ("kid", "KID"), ("precision", "precision"), ("recall", "recall"))
KEEP_PER_CLASS = 64  # images kept per class and set, for the diversity score and the grids


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


def _select(image_set: ImageSet, label: str | None) -> torch.Tensor:
    index = torch.tensor([i for i, value in enumerate(image_set.labels) if value == label])
    return image_set.features[index]


def distribution_metrics(real: torch.Tensor, fake: torch.Tensor, kid_subsets: int = 100) -> dict:
    """FID, KID, precision/recall and density/coverage of two feature sets (what their sizes allow)."""
    out: dict = {"n_real": int(real.shape[0]), "n_fake": int(fake.shape[0])}
    if min(len(real), len(fake)) >= 2:
        out["fid"] = fid(real, fake)
        score = kid(real, fake, subsets=kid_subsets, subset_size=1000)
        out["kid"], out["kid_std"], out["kid_subset_size"] = score.mean, score.std, score.subset_size
    if min(len(real), len(fake)) > 3:
        pr = precision_recall(real, fake, k=3)
        out["precision"], out["recall"] = pr.precision, pr.recall
    if min(len(real), len(fake)) > 5:
        dc = density_coverage(real, fake, k=5)
        out["density"], out["coverage"] = dc.density, dc.coverage
    return out


def open_folders(
    folders: dict[str, str | Path | None], data: DataConfig
) -> tuple[dict[str, ImageFolderDataset], tuple[int, ...]]:
    """Open every folder once (headers read), check that each holds images of the real ones' kind
    (2D/3D, channels) and at least 2 of them, and give all one transform: ``data``, resized to
    ``data.resize`` or else to the size of the first real image. ``data.labels`` is for the real
    folder; the others take their classes from their subfolders. Returns the datasets and the size."""
    datasets = {
        name: ImageFolderDataset(
            folder,
            labels=data.labels if name == "real" else None,
            transform=build_transform(data),
            skip_bad=data.skip_bad,
            validate="header",
        )
        for name, folder in folders.items()
        if folder is not None
    }
    reference = datasets["real"]
    for name, dataset in datasets.items():
        option = f"--{name} {folders[name]}"
        if len(dataset) < 2:
            raise ValueError(f"{option}: needs at least 2 images; found {len(dataset)}")
        if (dataset.spatial_dims, dataset.channels) != (reference.spatial_dims, reference.channels):
            raise ValueError(
                f"{option}: {dataset.spatial_dims}D images with {dataset.channels} channel(s), but "
                f"--real {folders['real']} holds {reference.spatial_dims}D with {reference.channels}; "
                "compare like with like"
            )
    size = tuple(data.resize or reference[0]["image"].shape[1:])
    transform = build_transform(data.replace(resize=size))
    for dataset in datasets.values():
        dataset.transform = transform
    return datasets, size


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
    """
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
            "overall": distribution_metrics(real_set.features, fake_set.features, kid_subsets),
            "per_class": {},
        }
        shared = [c for c in real_set.classes if c is not None and c in fake_set.classes]
        for label in shared:
            results["per_class"][label] = distribution_metrics(
                _select(real_set, label), _select(fake_set, label), kid_subsets
            )
        results["diversity"] = {
            name: {str(k): v for k, v in diversity(*_kept_images(s)).per_class.items()}
            for name, s in (("real", real_set), ("fake", fake_set))
            if any(len(v) >= 2 for v in s.kept.values())
        }
        if pipeline is not None:
            results["pipeline"] = pipeline
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
        log(f"# {headline(results)}\n# wrote {out / METRICS_FILE} and {out / REPORT_FILE}")
        return results


def headline(results: dict) -> str:
    """One line: the extractor and the overall numbers."""
    overall = results["overall"]
    parts = [f"{name} {overall[key]:.4g}" for key, name in HEADLINE if key in overall]
    return f"{results['extractor']}: " + ", ".join(parts)


def _kept_images(image_set: ImageSet) -> tuple[torch.Tensor, list]:
    labels, images = [], []
    for label, stack in image_set.kept.items():
        labels += [label] * len(stack)
        images.append(stack)
    return torch.cat(images), labels


def _path(image_set: ImageSet, index: int) -> str:
    return str(image_set.dataset.samples[index].path)
