"""``medfusion demo``: the whole pipeline on the bundled real data, within a time budget.

One call runs what a user runs on their own data, in order, with the same functions as the
commands: build the demo data (:mod:`medfusion.data.demo`, once, into a cache), inspect it, train
the VAE, train the class-conditional latent diffusion U-Net, sample a synthetic dataset, train the
domain feature extractor on the real training images, train a classifier on the synthetic and on
the real training images (TSTR beside TRTR), and evaluate the synthetic images against the
held-out real ones, with the calibration of the yardstick. Everything lands in one folder::

    OUT/autoencoder/      the VAE run (OUT/autoencoder/vae is the model)
    OUT/diffusion/        the U-Net run (checkpoints, logs, sample grids)
    OUT/model/            the model folder that ``medfusion sample`` takes
    OUT/synthetic/        the synthetic dataset (files, manifest.csv, dataset_card.json)
    OUT/features/         the domain feature extractor
    OUT/metrics.json      the evaluation; OUT/report.html shows it with the pipeline's timings
    OUT/demo.json         the plan (steps per stage and why) and the time each stage took

The time budget (``minutes``) is planned, not enforced: before each training stage one optimizer
step of its model is timed on this machine (:func:`~medfusion.training.loop.measure_step_seconds`)
and the stage gets as many steps as its share of the budget buys, within bounds. So a CPU trains
small models briefly and a GPU trains larger ones for longer, from the same command.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medfusion import __version__
from medfusion.runlock import LOCK_NAME, run_lock
from medfusion.utils import atomic_write_text, process_state

DATASETS_2D = ("xray", "color")
DATASET_3D = "volumes"
DEFAULT_MINUTES = 10.0
DEMO_FILE = "demo.json"
OUTPUTS = (
    "autoencoder",
    "diffusion",
    "model",
    "synthetic",
    "features",
    "metrics.json",
    "report.html",
    DEMO_FILE,
)
# shares of the time budget; the rest goes to the data, latent caching, sampling and evaluation
SHARES = {"autoencoder": 0.2, "diffusion": 0.33, "features": 0.12}
TSTR_STEPS = {2: 200, 3: 60}  # classifier steps of each TSTR/TRTR fit, by spatial dims
OVERHEAD = 1.25  # a training step in the loop (data, EMA, logging) over the probe's bare step
STEP_BOUNDS = {"autoencoder": (100, 5000), "diffusion": (300, 20000), "features": (100, 2000)}


@dataclass(frozen=True)
class DemoModels:
    """Model sizes and batch sizes of one demo profile (the rest are the library defaults)."""

    vae_channels: tuple[int, ...]
    vae_batch: int
    unet_channels: tuple[int, ...]
    unet_layers: int
    unet_batch: int
    encoder_channels: tuple[int, ...]
    encoder_batch: int
    mixed_precision: str = "no"
    num_workers: int = 0


PROFILES = {
    # (spatial dims, accelerator): small enough for two CPU cores, larger where a GPU gives the time
    (2, "cpu"): DemoModels((32, 64, 128), 16, (64, 128, 128), 1, 32, (16, 32, 64, 128), 32),
    (2, "cuda"): DemoModels((64, 128, 256), 32, (128, 256, 256), 2, 128, (32, 64, 128, 256), 128, "bf16", 4),
    (3, "cpu"): DemoModels((16, 32, 64), 4, (32, 64, 64), 1, 16, (16, 32, 64), 16),
    (3, "cuda"): DemoModels((32, 64, 128), 8, (64, 128, 128), 2, 64, (32, 64, 128), 64, "bf16", 4),
}  # fmt: skip


@dataclass
class DemoResult:
    """What :func:`run_demo` did: the run folder, the report, the metrics and per-stage timings."""

    out: Path
    report: Path
    metrics: dict
    stages: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0


def plan_steps(stage: str, seconds_per_step: float, budget_seconds: float) -> int:
    """Optimizer steps of ``stage`` that its share of ``budget_seconds`` buys at ``seconds_per_step``
    (times :data:`OVERHEAD`), within the stage's :data:`STEP_BOUNDS`."""
    low, high = STEP_BOUNDS[stage]
    affordable = SHARES[stage] * budget_seconds / (seconds_per_step * OVERHEAD)
    return int(min(high, max(low, math.floor(affordable))))


def _check_out(out: Path, force: bool) -> None:
    """``out`` must be new, empty (but for a lock file), or (with ``force``) an earlier demo run,
    whose outputs are removed."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder for the demo run")
    if not out.is_dir() or not any(p.name != LOCK_NAME for p in out.iterdir()):
        return
    if not (out / DEMO_FILE).is_file() and not (out / "autoencoder").is_dir():
        raise FileExistsError(f"--out {out} is not empty and not a medfusion demo run; choose another folder")
    if not force:
        raise FileExistsError(f"--out {out} holds an earlier demo run; pass --force to replace it")
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() and not os.environ.get("ACCELERATE_USE_CPU") else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here")
    return device


def run_demo(
    out: str | os.PathLike = "medfusion-demo",
    three_d: bool = False,
    dataset: str | None = None,
    minutes: float = DEFAULT_MINUTES,
    data_dir: str | os.PathLike | None = None,
    device: str | None = None,
    force: bool = False,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the whole pipeline on a bundled dataset into ``out`` in about ``minutes``.

    Args:
        out: the run folder (new, empty, or an earlier demo run with ``force``).
        three_d: the 3D demo (MRI volumes) instead of 2D.
        dataset: which bundled dataset: ``xray`` (default 2D: chest, limb, CT, MR), ``color``
            (fundus, histology) or ``volumes`` (3D).
        minutes: the time budget the training stages are planned to (see the module docstring).
        data_dir: where the demo data is built once and reused (default: the user cache).
        device: ``cpu``, ``cuda``, ``cuda:1``...; default: CUDA when available.
        force: replace an earlier demo run in ``out``.
        seed: seeds the data crops, training and sampling.
        progress: progress bars.
        log: where stage headers and summaries go.
    """
    dataset = dataset or (DATASET_3D if three_d else DATASETS_2D[0])
    if dataset not in (*DATASETS_2D, DATASET_3D):
        raise ValueError(f"--dataset must be one of {(*DATASETS_2D, DATASET_3D)}; got {dataset!r}")
    if three_d and dataset != DATASET_3D:
        raise ValueError(f"--3d runs the {DATASET_3D!r} dataset; got --dataset {dataset}")
    if not minutes > 0:
        raise ValueError(f"--minutes must be > 0; got {minutes}")
    if process_state().num_processes > 1:
        raise RuntimeError("medfusion demo runs in one process; use the single commands under a launcher")
    out = Path(out)
    device = _device(device)
    with run_lock(out, "medfusion demo"):  # the stages lock their own folders (or this one again)
        _check_out(out, force)
        return _run_stages(out, dataset, minutes, data_dir, device, seed, progress, log)


def _run_stages(out: Path, dataset: str, minutes: float, data_dir, device: str, seed: int, progress, log):
    from medfusion.data.demo import build_demo_data
    from medfusion.data.inspect import inspect_dataset

    spatial_dims = 3 if dataset == DATASET_3D else 2
    profile = PROFILES[(spatial_dims, "cuda" if device.startswith("cuda") else "cpu")]
    budget = 60.0 * minutes
    start = time.perf_counter()
    stages: dict[str, dict] = {}
    total = 8

    def stage(number: int, name: str, text: str) -> float:
        log(f"\n[{number}/{total}] {text}")
        return time.perf_counter()

    def done(name: str, started: float, **details) -> None:
        stages[name] = {"seconds": round(time.perf_counter() - started, 1), **details}

    t = stage(1, "data", "demo data (built once from files inside installed packages, then reused)")
    root = build_demo_data(data_dir, datasets=(dataset,), seed=seed, progress=progress) / dataset
    train_dir, heldout_dir = root / "train", root / "heldout"
    sources = root.parent / "DATA_SOURCES.md"
    log(f"data: {train_dir} (training) and {heldout_dir} (held out); sources in {sources}")
    done("data", t, path=str(root))

    t = stage(2, "inspect", f"medfusion data inspect {train_dir}")
    report = inspect_dataset(train_dir, progress=progress)
    log(report.format())
    if not report.usable:
        raise RuntimeError(f"the demo data in {train_dir} is not usable (see above); rebuild it with --force")
    done("inspect", t, files=report.summary().get("files"))
    demo_data = _DemoData.open(root)

    out.mkdir(parents=True, exist_ok=True)
    t = stage(3, "autoencoder", "training the autoencoder")
    vae_path, vae_eval = _train_autoencoder(demo_data, out, profile, budget, seed, progress, log)
    done("autoencoder", t, **vae_eval)

    t = stage(4, "diffusion", "training the class-conditional latent diffusion U-Net")
    model_path, diffusion_info = _train_unet(demo_data, vae_path, out, profile, budget, seed, progress, log)
    done("diffusion", t, **diffusion_info)

    t = stage(5, "sample", "sampling a synthetic dataset")
    sample_info = _sample(model_path, heldout_dir, out / "synthetic", device, seed, progress, log)
    done("sample", t, **sample_info)

    t = stage(6, "features", "training the domain feature extractor on the real training images")
    features_info = _train_features(demo_data, out / "features", profile, budget, seed, progress, log)
    done("features", t, **features_info)

    t = stage(7, "tstr", "train on synthetic, test on real: a classifier on each, tested on held-out images")
    utility = _utility(demo_data, out / "synthetic", device, seed, progress, log)
    done("tstr", t, steps=utility["config"]["max_steps"], seeds=len(utility["seeds"]))

    t = stage(8, "evaluate", "evaluating the synthetic images against the held-out real images, calibrated")
    from medfusion.metrics.evaluate import evaluate, headline
    from medfusion.metrics.features import load_extractor

    pipeline = {
        "dataset": dataset,
        "device": device,
        "budget_minutes": minutes,
        "stages": stages,
        "medfusion_version": __version__,
    }
    metrics = evaluate(
        heldout_dir,
        out / "synthetic",
        out,
        load_extractor(out / "features", device),
        train=train_dir,
        device=device,
        progress=progress,
        log=lambda message: None,
        pipeline=pipeline,
        seed=seed,
        utility=utility,
        calibrate=True,
    )
    done("evaluate", t)
    seconds = time.perf_counter() - start
    summary = {**pipeline, "seconds": round(seconds, 1), "headline": headline(metrics)}
    atomic_write_text(out / DEMO_FILE, json.dumps(summary, indent=2) + "\n")
    return DemoResult(out, out / "report.html", metrics, stages, seconds)


def _train_config(
    profile: DemoModels, steps: int, batch: int, learning_rate: float, seed: int, **extra
) -> dict:
    return {
        "max_steps": steps,
        "batch_size": batch,
        "learning_rate": learning_rate,
        "lr_schedule": "cosine",
        "warmup_steps": min(50, steps // 10),
        "mixed_precision": profile.mixed_precision,
        "checkpoint_every": steps,
        "keep_checkpoints": 1,
        "log_every": 10,
        "num_workers": profile.num_workers,
        "seed": seed,
        **extra,
    }


@dataclass(frozen=True)
class _DemoData:
    """The demo dataset as the stages need it, read once: folders, image size, channels, classes."""

    train: Path
    heldout: Path
    size: tuple[int, ...]  # spatial, array order
    channels: int
    classes: tuple[str, ...]

    @classmethod
    def open(cls, root: Path) -> _DemoData:
        from medfusion.data.dataset import ImageFolderDataset

        dataset = ImageFolderDataset(root / "train", validate="none")
        item = dataset[0]["image"]
        return cls(
            root / "train", root / "heldout", tuple(item.shape[1:]), int(item.shape[0]), dataset.class_names
        )

    @property
    def dims(self) -> int:
        return len(self.size)

    def section(self) -> dict:
        """The ``data`` config section: the images' own size, flips along the width."""
        return {"crop": list(self.size), "flip_axes": [self.dims - 1]}


def _train_autoencoder(demo_data: _DemoData, out, profile, budget, seed, progress, log):
    import torch

    from medfusion.autoencoders.losses import VAELoss
    from medfusion.training.loop import measure_step_seconds
    from medfusion.training.vae import VAERunConfig, VAETask, train_vae

    data, dims, channels = demo_data.section(), demo_data.dims, demo_data.channels
    base = {
        "data": data,
        "model": {
            "block_out_channels": list(profile.vae_channels),
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 8,
        },
        "loss": {"pixel_loss": "l1", "kl_weight": 1e-6},
        "heldout": str(demo_data.heldout),
        "train": _train_config(profile, 1, profile.vae_batch, 1e-3, seed, ema_decay=0.99, preview_every=0),
    }
    config = VAERunConfig.from_dict(base, source="medfusion demo")
    model = config.model.resolve(dims, channels)
    torch.manual_seed(seed)
    throwaway = VAETask(model.build(dims, channels), VAELoss(config.loss, dims, channels))
    shape = (profile.vae_batch, channels, *data["crop"])
    seconds = measure_step_seconds(throwaway, {"image": torch.rand(shape) * 2 - 1}, config.train)
    steps = plan_steps("autoencoder", seconds, budget)
    log(f"plan: {steps} steps of batch {profile.vae_batch} ({seconds:.3f} s per step measured here)")
    base["train"] = _train_config(
        profile, steps, profile.vae_batch, 1e-3, seed, ema_decay=0.99, preview_every=max(1, steps // 4)
    )
    train_vae(
        demo_data.train,
        out / "autoencoder",
        VAERunConfig.from_dict(base, source="medfusion demo"),
        progress=progress,
        log=_quiet_config(log),
    )
    evaluation = json.loads((out / "autoencoder" / "vae_eval.json").read_text(encoding="utf-8"))
    scores = {k: evaluation[k] for k in ("psnr", "ssim", "ms_ssim") if isinstance(evaluation.get(k), float)}
    log("autoencoder on held-out images: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    return out / "autoencoder" / "vae", {
        "steps": steps,
        "seconds_per_step_probe": round(seconds, 4),
        **scores,
    }


def _train_unet(demo_data: _DemoData, vae_path, out, profile, budget, seed, progress, log):
    import torch

    from medfusion.training.diffusion import MODEL_DIR, DiffusionRunConfig, DiffusionTask, train_diffusion
    from medfusion.training.loop import measure_step_seconds
    from medfusion.training.vae import load_vae

    data, dims, num_classes = demo_data.section(), demo_data.dims, len(demo_data.classes)
    levels = len(profile.unet_channels)
    base = {
        "data": data,
        "model": {
            "block_out_channels": list(profile.unet_channels),
            "layers_per_block": profile.unet_layers,
            "attention_levels": [False] * (levels - 1) + [True],
            "num_head_channels": 32,
            "norm_num_groups": 16,
        },
        "diffusion": {"beta_schedule": "scaled_linear", "prediction_type": "epsilon", "label_dropout": 0.1},
        "cache_latents": True,
        "preview": {"per_class": 8, "steps": 25, "guidance_scale": 3.0},
        "train": _train_config(profile, 1, profile.unet_batch, 1e-3, seed, ema_decay=0.995, preview_every=0),
    }
    config = DiffusionRunConfig.from_dict(base, source="medfusion demo")
    vae = load_vae(vae_path)
    latent_shape = vae.latent_shape(tuple(data["crop"]))
    torch.manual_seed(seed)
    unet = config.model.build(dims, vae.config.latent_channels, num_classes)
    throwaway = DiffusionTask(unet, vae, config, latent_shape)
    batch = {
        "latent_mean": torch.randn(profile.unet_batch, *latent_shape),
        "latent_std": torch.full((profile.unet_batch, *latent_shape), 0.1),
        "label": torch.arange(profile.unet_batch) % num_classes,
    }
    seconds = measure_step_seconds(throwaway, batch, config.train)
    steps = plan_steps("diffusion", seconds, budget)
    log(f"plan: {steps} steps of batch {profile.unet_batch} ({seconds:.3f} s per step measured here)")
    base["train"] = _train_config(
        profile, steps, profile.unet_batch, 1e-3, seed, ema_decay=0.995, preview_every=0
    )
    train_diffusion(
        demo_data.train,
        vae_path,
        out,
        DiffusionRunConfig.from_dict(base, source="medfusion demo"),
        progress=progress,
        log=_quiet_config(log),
    )
    return out / MODEL_DIR, {"steps": steps, "seconds_per_step_probe": round(seconds, 4)}


def _sample(model_path, heldout_dir, synthetic, device, seed, progress, log):
    from medfusion.samplers.schedulers import SamplerConfig
    from medfusion.samplers.synthetic import write_synthetic_dataset

    per_class = max(len(list(p.iterdir())) for p in heldout_dir.iterdir() if p.is_dir())
    n = max(16, per_class)  # as many as the held-out images of a class
    sampler = SamplerConfig()
    result = write_synthetic_dataset(
        model_path, synthetic, n=n, sampler=sampler, seed=seed, device=device, progress=progress
    )
    rate = result.written / result.seconds if result.seconds > 0 else 0.0
    log(f"wrote {result.total} samples ({n} per class; {sampler.name}, {sampler.steps} steps) in "
        f"{result.seconds:.1f} s ({rate:.1f} images/s) to {synthetic}")  # fmt: skip
    return {
        "per_class": n,
        "sampler": sampler.name,
        "sampler_steps": sampler.steps,
        "images_per_second": round(rate, 2),
    }


def _train_features(demo_data: _DemoData, features_dir, profile, budget, seed, progress, log):
    import torch

    from medfusion.metrics.features import DomainEncoder
    from medfusion.training.features import (
        VALIDATION_FILE,
        EncoderTrainer,
        FeaturesRunConfig,
        FeaturesTask,
        train_domain_encoder,
    )
    from medfusion.training.loop import measure_step_seconds

    size, channels, dims = demo_data.size, demo_data.channels, demo_data.dims
    groups = min(16, profile.encoder_channels[0])
    base = {
        "model": {"block_out_channels": list(profile.encoder_channels), "norm_num_groups": groups},
        "train": _train_config(
            profile, 1, profile.encoder_batch, 1e-3, seed, preview_every=0, ema_decay=None
        ),
    }
    config = FeaturesRunConfig.from_dict(base, source="medfusion demo")
    torch.manual_seed(seed)
    encoder = DomainEncoder(
        spatial_dims=dims, in_channels=channels, image_size=size, **config.model.to_dict()
    )
    classes = len(demo_data.classes)
    throwaway = FeaturesTask(EncoderTrainer(encoder, config.projection_dim, classes), config)
    batch = {
        "image": torch.rand(profile.encoder_batch, channels, *size) * 2 - 1,
        "label": torch.arange(profile.encoder_batch) % classes,
    }
    seconds = measure_step_seconds(throwaway, batch, config.train)
    steps = plan_steps("features", seconds, budget)
    log(f"plan: {steps} steps of batch {profile.encoder_batch} ({seconds:.3f} s per step measured here)")
    base["train"] = _train_config(
        profile, steps, profile.encoder_batch, 1e-3, seed, preview_every=0, ema_decay=None
    )
    train_domain_encoder(
        demo_data.train,
        features_dir,
        FeaturesRunConfig.from_dict(base, source="medfusion demo"),
        progress=progress,
        log=_quiet_config(log),
    )
    validation = json.loads((features_dir / VALIDATION_FILE).read_text(encoding="utf-8"))
    return {
        "steps": steps,
        "seconds_per_step_probe": round(seconds, 4),
        "steps_run": validation["last_step"],
        "kept_step": validation["kept_step"],
    }


def _utility(demo_data: _DemoData, synthetic: Path, device: str, seed: int, progress, log) -> dict:
    """TSTR beside TRTR on the demo data: the downstream classifier, 3 seeds a side (fewer steps in
    3D, where a step costs more)."""
    from medfusion.config import DataConfig
    from medfusion.downstream import ClassifierConfig, tstr

    config = ClassifierConfig(
        max_steps=TSTR_STEPS[demo_data.dims], batch_size=32 if demo_data.dims == 2 else 16
    )
    seeds = tuple(range(seed, seed + 3))
    result = tstr(demo_data.train, synthetic, demo_data.heldout, DataConfig(), config, seeds=seeds,
                  device=device, progress=progress, log=lambda message: None)  # fmt: skip
    synthetic_score, real_score = (result[k]["balanced_accuracy"]["mean"] for k in ("tstr", "trtr"))
    log(
        "balanced accuracy on held-out real images: trained on synthetic "
        f"{synthetic_score:.3f}, on real {real_score:.3f}"
    )
    return result


def _quiet_config(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` without the resolved-config dumps of the training commands (the demo's configs are
    in each run folder's ``config.yaml``)."""

    def forward(message: str) -> None:
        if "resolved config" not in message:
            log(message)

    return forward
