"""Benchmark the distribution metrics on feature arrays: time and peak memory per metric.

Random Gaussian features stand in for an extractor's output (``--n`` real vs ``--n`` synthetic
vectors of width ``--dim``; 2048 is Inception's pool width). ``--metric features`` times the
extraction itself: ``2 * --n`` random ``--size``² grayscale images through the default domain
encoder. ``--metric diversity`` times the diversity score (mean pairwise MS-SSIM, 1000 pairs at
most) of ``--n`` random grayscale images or volumes (``--spatial-dims``) of side ``--size``, at most
as many as evaluate keeps per class. ``--metric calibration`` times ``evaluate --calibrate`` on
random ``--size``² images (at most 1000 a side, as it draws). Each metric runs in a fresh process so
that its peak resident memory (CPU) or peak allocated memory (GPU) is its own. The nearest-
neighbour metrics work block-wise: their memory grows with ``block_size * N``, not ``N * N``.

    python scripts/bench_metrics.py --n 10000 --dim 2048
    python scripts/bench_metrics.py --n 10000 --dim 2048 --device cuda
    python scripts/bench_metrics.py --n 10000 --metric features --size 256
    python scripts/bench_metrics.py --n 64 --metric diversity --size 32 --spatial-dims 3
    python scripts/bench_metrics.py --n 10000 --metric calibration --size 64
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time

import torch

from medfusion.metrics import density_coverage, diversity, fid, kid, memorisation_audit, precision_recall
from medfusion.metrics.evaluate import KEEP_PER_CLASS


def extract_features(args) -> float:
    """Features of 2 x --n random --size^2 grayscale images through a fresh domain encoder of the
    default shape and size (images resized to at most 128 per side, as the default encoder does;
    weights do not change the cost), in batches of --batch."""
    from medfusion.metrics.features import DomainEncoder, FeatureExtractor
    from medfusion.training.features import MAX_DEFAULT_SIDE

    side = min(args.size, MAX_DEFAULT_SIDE)  # the default encoder works at most at 128 per side
    encoder = DomainEncoder(
        spatial_dims=2, in_channels=1, image_size=(side, side), pooling=args.pooling
    ).eval()
    extractor = FeatureExtractor(encoder.to(args.device), "domain", encoder.num_features, 2, 1, (side, side))
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    for start in range(0, 2 * args.n, args.batch):
        images = torch.rand(min(args.batch, 2 * args.n - start), 1, args.size, args.size, generator=generator)
        total += float(extractor(images.to(args.device) * 2 - 1).sum())
    return total


def calibration(args) -> float:
    """``evaluate --calibrate`` on min(--n, its cap) random --size^2 grayscale images: the six
    degradations through a fresh default-shape domain encoder (multi-scale features) and the
    point metrics of each against as many real features."""
    from medfusion.metrics.calibration import MAX_IMAGES, calibrate
    from medfusion.metrics.evaluate import point_metrics
    from medfusion.metrics.features import DomainEncoder, FeatureExtractor
    from medfusion.training.features import MAX_DEFAULT_SIDE

    side = min(args.size, MAX_DEFAULT_SIDE)
    encoder = DomainEncoder(spatial_dims=2, image_size=(side, side), pooling="multiscale").eval()
    extractor = FeatureExtractor(encoder.to(args.device), "domain", encoder.num_features, 2, 1, (side, side))
    n = min(args.n, MAX_IMAGES)
    images = torch.rand(2 * n, 1, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    dataset = [{"image": image} for image in images]
    real = torch.cat([extractor(b.to(args.device)) for b in images[:n].split(args.batch)]).double().cpu()
    result = calibrate(extractor, real, dataset, torch.arange(n, 2 * n), real, point_metrics,
                       batch_size=args.batch, device=args.device, progress=False)  # fmt: skip
    return result["degradations"]["blur_2"]["fid_ratio"]


def image_diversity(args) -> float:
    """Diversity of min(--n, KEEP_PER_CLASS) random --size^2 images or --size^3 volumes (one class)."""
    shape = (min(args.n, KEEP_PER_CLASS), 1) + (args.size,) * args.spatial_dims
    images = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return diversity(images.to(args.device)).per_class[None]


IMAGE_METRICS = ("features", "diversity", "calibration")  # opt-in: they time images, not feature arrays
METRICS = {
    "calibration": lambda real, fake, args: calibration(args),
    "features": lambda real, fake, args: extract_features(args),
    "diversity": lambda real, fake, args: image_diversity(args),
    "fid": lambda real, fake, args: fid(real, fake),
    "kid": lambda real, fake, args: kid(real, fake, subsets=100, subset_size=1000).mean,
    "precision_recall": lambda real, fake, args: (
        precision_recall(real, fake, block_size=args.block_size).precision
    ),
    "density_coverage": lambda real, fake, args: (
        density_coverage(real, fake, block_size=args.block_size).coverage
    ),
    "memorisation": lambda real, fake, args: (
        memorisation_audit(
            real, fake, real.flip(0)[: len(real) // 2] + 0.1, block_size=args.block_size
        ).fraction_flagged
    ),
}


def run(name: str, args: argparse.Namespace, queue) -> None:
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(args.n, args.dim, generator=generator).to(device)
    fake = (torch.randn(args.n, args.dim, generator=generator) * 1.1 + 0.05).to(device)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    value = METRICS[name](real, fake, args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {"metric": name, "n": args.n, "dim": args.dim, "device": str(device), "seconds": round(seconds, 2)}
    row["value"] = round(float(value), 5)
    row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    row["rss_growth_gb"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1e6, 2)
    if device.type == "cuda":
        row["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    queue.put(row)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10000, help="real and synthetic feature vectors each")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument(
        "--metric",
        nargs="+",
        choices=sorted(METRICS),
        default=[name for name in METRICS if name not in IMAGE_METRICS],
    )
    parser.add_argument("--size", type=int, default=256, help="image side for --metric features/diversity")
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2, help="for --metric diversity")
    parser.add_argument("--batch", type=int, default=64, help="images per batch for --metric features")
    parser.add_argument(
        "--pooling",
        choices=("multiscale", "mean"),
        default="multiscale",
        help="of the encoder (--metric features)",
    )
    parser.add_argument("--block-size", type=int, default=1024, help="rows per nearest-neighbour block")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    for name in args.metric:
        queue = context.Queue()
        process = context.Process(target=run, args=(name, args, queue))
        process.start()
        process.join()
        print(
            json.dumps(queue.get() if process.exitcode == 0 else {"metric": name, "error": process.exitcode})
        )


if __name__ == "__main__":
    main()
